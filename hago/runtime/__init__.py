"""Execution on onnxruntime (fast fp32 and QDQ runs for calibration and accuracy)."""
