"""Loss of the tiny digits BERT (tests/helpers.py) under a few rules and lr multipliers: python benchmarks/lr_multiplier_probe.py"""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
import torch
torch.set_num_threads(1)
from helpers import digits_bert, digits_dataset
from optbundle import LearnedOptimizer, load_rule
ds = digits_dataset(512)
ids = torch.tensor(ds["input_ids"]); y = torch.tensor(ds["labels"])
for name, lr in [("adam-init", 3.0), ("default-v2", 3.0), ("default-v2", 1.0), ("default-v1", 1.0)]:
    torch.manual_seed(0)
    m = digits_bert(0)
    opt = LearnedOptimizer(m.parameters(), load_rule(name), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(150):
        idx = torch.randint(0, 512, (32,), generator=g)
        loss = m(input_ids=ids[idx], labels=y[idx]).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(float(loss.detach()))
    print(name, lr, [round(sum(losses[i:i+10])/10, 3) for i in range(0, 150, 30)])
