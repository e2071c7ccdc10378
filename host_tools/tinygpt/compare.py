"""Float (Hugging Face) vs INT8 (C engine) logits on the same tokens."""
import numpy as np


def hf_logits(hf_dir, ids):
    """Float32 logits [len(ids), vocab] of the Hugging Face model in hf_dir (eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM  # GPT-2 or Llama, from config.json

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long))
    return out.logits[0].numpy().astype(np.float32)


def engine_logits(model, ids):
    """INT8 engine logits [len(ids), vocab]: one step per token, each position's logits kept."""
    model.reset()
    rows = []
    for t in ids:
        model.step(int(t))
        rows.append(np.frombuffer(model.logits(), dtype=np.float32).copy())
    return np.stack(rows)


def agreement(float_logits, int8_logits):
    """Per-position cosine similarity and top-1 agreement of two [n, vocab] logit arrays."""
    a = np.asarray(float_logits, np.float64)
    b = np.asarray(int8_logits, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    top1 = a.argmax(1) == b.argmax(1)
    return {"positions": len(a), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "top1_agree": int(top1.sum()), "cosine": cos, "top1": top1}
