"""hago: hardware-aware post-training quantization compiler (ONNX -> integer TVM code)."""
from setuptools import find_packages, setup

setup(
    name="hago",
    version="0.1.0",
    description="Hardware-aware post-training quantization compiler: ONNX in, QDQ ONNX and integer TVM code out",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hago", "hago.*"]) + ["hago.hwspec.specs"],
    package_dir={"hago.hwspec.specs": "hwspecs"},
    package_data={"hago.hwspec.specs": ["*.json"], "hago.examples": ["models/*.onnx", "models/*.md"]},
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "onnx>=1.17",
        "onnx-ir>=0.1.10",
        "onnxruntime>=1.20",
        "apache-tvm==0.27.0.post1",
        "apache-tvm-ffi==0.1.14.post0",  # 0.1.15 makes MetaSchedule segfault
        "xgboost-cpu>=2.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "examples": ["mlxtend>=0.23", "scikit-learn>=1.3", "rapidocr-onnxruntime>=1.3", "Pillow>=10.1"],
        "train": ["torch==2.13.0"],
        "dev": ["pytest>=7", "jsonschema>=4", "tornado>=6", "mlxtend>=0.23", "scikit-learn>=1.3", "rapidocr-onnxruntime>=1.3",
                "Pillow>=10.1"],
    },
    entry_points={"console_scripts": ["hago=hago.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
