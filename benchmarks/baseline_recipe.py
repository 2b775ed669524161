"""Which baseline training recipe reaches the best test accuracy in a time budget? (issue 10, lever 1)

Trains the network from scratch with each recipe on the same splits run_agent.py uses and prints
test accuracy (plain and, separately, with a horizontal-flip test-time average), held-out
accuracy and seconds. A recipe is ``name:key=value,...`` with keys

    ep   epochs (default --baseline-epochs)       lr   peak learning rate (default --lr)
    bs   batch size (default --batch-size)        ls   label smoothing (default 0.1)
    wd   weight decay (default 5e-4)              sched  onecycle | cosine | constant (default onecycle)

run_agent.py's baseline is ``ep=--baseline-epochs, lr=--lr, bs=--batch-size, ls=0.1``.

    python benchmarks/baseline_recipe.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --recipes a:ep=20 b:ep=20,lr=0.1 c:ep=40
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_common_args, machine

from agents.config import RunConfig
from agents.inputs import load_data
from rl_mtd.data import DeviceLoader, channels_last_inputs
from rl_mtd.errors import exit_on_user_error
from rl_mtd.evaluation import evaluate
from rl_mtd.io import write_json_atomic
from rl_mtd.models import build_vgg, model_device
from rl_mtd.proxy import resolve_device
from rl_mtd.train import TrainConfig, train

KEYS = {
    "ep": ("epochs", float),
    "lr": ("lr", float),
    "bs": ("batch_size", int),
    "ls": ("label_smoothing", float),
    "wd": ("weight_decay", float),
    "sched": ("schedule", str),
}


def parse(text: str, defaults: dict) -> tuple[str, TrainConfig]:
    name, _, body = text.partition(":")
    values = dict(defaults)
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in KEYS or not eq:
            raise SystemExit(f"bad recipe item {item!r} in {text!r}; keys: {', '.join(KEYS)}")
        field, kind = KEYS[key]
        values[field] = kind(value)
    return name or text, TrainConfig(**values)


@torch.no_grad()
def flip_accuracy(model: torch.nn.Module, split) -> float:
    """Test accuracy of the mean softmax over the image and its mirror image."""
    device = model_device(model)
    model.eval()
    correct = 0
    for x, y in DeviceLoader(split.to(device), 1000, channels_last=channels_last_inputs(device)):
        p = model(x).softmax(1) + model(x.flip(3)).softmax(1)
        correct += int((p.argmax(1) == y).sum())
    return correct / len(split)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--recipes", nargs="+", required=True, help="name:key=value,... (see above)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    cfg = RunConfig(
        net=args.net,
        width=args.width,
        data=args.data,
        train_size=args.train_size,
        proxy_size=args.proxy_size,
        test_size=args.test_size,
        device=args.device,
        seed=args.seed,
        progress=False,
    )
    defaults = {
        "epochs": args.baseline_epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "label_smoothing": 0.1,
        "seed": args.seed,
    }
    recipes = [parse(r, defaults) for r in args.recipes]
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    splits, data = load_data(cfg)
    splits = splits.to(device)
    print(f"data: {data.source}, {time.perf_counter() - t0:.0f} s; {machine()}", flush=True)
    print(
        "| recipe | epochs | lr | batch | label smoothing | test acc | test acc, flip TTA | held-out acc | s |"
    )
    print("|-|-:|-:|-:|-:|-:|-:|-:|-:|")
    rows = []
    for name, tcfg in recipes:
        torch.manual_seed(args.seed)
        model = build_vgg(args.net, width=args.width).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.backends.cudnn.flags(benchmark=True):
            result = train(model, splits.train, config=tcfg, val_split=splits.proxy, desc=name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {
            "recipe": name,
            "config": {k: getattr(tcfg, k) for k, _ in KEYS.values()},
            "test_acc": evaluate(model, splits.test, full_precision=True),
            "test_acc_flip": flip_accuracy(model, splits.test),
            "heldout_acc": result.best_acc,
            "recoveries": result.recoveries,
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"| {name} | {tcfg.epochs:g} | {tcfg.lr:g} | {tcfg.batch_size} | "
            f"{tcfg.label_smoothing:g} | {100 * row['test_acc']:.2f}% | "
            f"{100 * row['test_acc_flip']:.2f}% | {100 * result.best_acc:.2f}% | {seconds:.0f} |",
            flush=True,
        )
        if args.out:
            write_json_atomic(args.out, rows)


if __name__ == "__main__":
    exit_on_user_error(main)
