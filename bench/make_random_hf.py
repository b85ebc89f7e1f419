"""Write a random-weight Hugging Face GPT-2 of a given shape (for GPU benchmarks that need a checkpoint
folder, e.g. bench/serve_load.py): python bench/make_random_hf.py DST [--layers 24 --hidden 1024 --heads 16]."""
import argparse

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("dst")
ap.add_argument("--layers", type=int, default=24)
ap.add_argument("--hidden", type=int, default=1024)
ap.add_argument("--heads", type=int, default=16)
ap.add_argument("--vocab", type=int, default=50257)
ap.add_argument("--positions", type=int, default=1024)
a = ap.parse_args()
torch.manual_seed(0)
cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.positions, n_embd=a.hidden, n_layer=a.layers,
                              n_head=a.heads)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = transformers.GPT2LMHeadModel(cfg)
model.to("cpu").save_pretrained(a.dst)
print("wrote", a.dst)
