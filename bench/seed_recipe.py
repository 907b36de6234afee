"""The PyTorch tutorial xfer's classic recipe comes from, as written, against `launch.py`'s default run.

    python bench/seed_recipe.py --res 64 --per-class 100              # 1000 train images, 10 epochs
    python bench/seed_recipe.py --res 224 --per-class 10 --seeds 0    # a slice at the tutorial's size

Both sides train VGG16 -> 10 classes on the same real CIFAR-10 images (a class-balanced slice of
../shared/data/cifar10_subset, the tutorial's `train` and a `val` split for testing), from the same
VGG16 weights: torchvision's architecture with a random init, saved once as a .pth (speed and
agreement do not need ImageNet weights). Each side gets its own 10-way head, initialised its own
way from the seed, as the tutorial replaces `classifier[6]`.

torch: the tutorial's code, line for line: `Resize((res, res))`, `ToTensor()`,
`Normalize((0.5,)*3, (0.5,)*3)`, `DataLoader(batch_size=4, shuffle=True, num_workers=2)`, 10
epochs of `SGD(classifier params, lr=0.001, momentum=0.9)` with `model.features` frozen, then one
pass over the test split; torch threads = the cores this process may use (XLA's pool).
xfer: `python launch.py --config=configs/vgg16_cifar.py:res=R` with only the data, the init and the
workdir overridden (the default: feature cache, launch.py's XLA flags).

Printed per seed and side: wall-clock seconds from the start of the process (xfer) or of the
training loop (torch: model and data set-up excluded, which favours torch) to the end of training,
and test accuracy. The ratio torch / xfer is the speed-up.

Then what bounds it: torch's tutorial step at batch 4 against the same step on features computed
beforehand (the classifier's forward, backward and SGD update: what a step on the feature cache
still pays, on either side). Their ratio is the speed-up the cache allows on an endless data set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10_subset"


def slice_images(source: Path, target: Path, per_class: int, test_per_class: int) -> None:
    """Symlinks the first `per_class` (train) and `test_per_class` (val) images of every class."""
    for split, count in (("train", per_class), ("val", test_per_class)):
        for class_dir in sorted((source / split).iterdir()):
            (target / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / split / class_dir.name / image.name).symlink_to(image)


def torch_tutorial(images: Path, weights: Path, res: int, epochs: int, seed: int) -> dict:
    import torch
    import torchvision
    from torch import nn, optim
    from torchvision import transforms

    torch.manual_seed(seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    transform = transforms.Compose([transforms.Resize((res, res)), transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = torchvision.datasets.ImageFolder(str(images / "train"), transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
    testset = torchvision.datasets.ImageFolder(str(images / "val"), transform=transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=4, shuffle=False, num_workers=2)

    model = torchvision.models.vgg16()
    model.load_state_dict(torch.load(weights))
    for param in model.features.parameters():
        param.requires_grad = False
    model.classifier[6] = nn.Linear(4096, 10)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.classifier.parameters(), lr=0.001, momentum=0.9)

    start = time.perf_counter()
    for epoch in range(epochs):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}", flush=True)
                running_loss = 0.0
    seconds = time.perf_counter() - start

    correct = total = 0
    model.eval()
    with torch.no_grad():
        for inputs, labels in testloader:
            correct += (model(inputs).argmax(1) == labels).sum().item()
            total += labels.numel()
    return {"side": "torch", "seed": seed, "train_seconds": seconds, "accuracy": correct / total}


def torch_step_bound(weights: Path, res: int, steps: int = 5) -> dict:
    """Seconds of the tutorial's step at batch 4, whole and on precomputed features, alternating."""
    import torch
    import torchvision
    from torch import nn, optim

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = torchvision.models.vgg16()
    model.load_state_dict(torch.load(weights))
    for param in model.features.parameters():
        param.requires_grad = False
    model.classifier[6] = nn.Linear(4096, 10)
    criterion, optimizer = nn.CrossEntropyLoss(), optim.SGD(model.classifier.parameters(), lr=0.001, momentum=0.9)
    inputs, labels = torch.randn(4, 3, res, res), torch.randint(0, 10, (4,))
    with torch.no_grad():
        features = torch.flatten(model.avgpool(model.features(inputs)), 1)

    def step(head_only: bool) -> None:
        optimizer.zero_grad()
        logits = model.classifier(features) if head_only else model(inputs)
        criterion(logits, labels).backward()
        optimizer.step()

    seconds = {False: [], True: []}
    for window in range(4):  # the first is a warm-up
        for head_only in (False, True):
            start = time.perf_counter()
            for _ in range(steps):
                step(head_only)
            if window:
                seconds[head_only].append((time.perf_counter() - start) / steps)
    whole, head = min(seconds[False]), min(seconds[True])
    return {"res": res, "torch_step_s": whole, "torch_classifier_step_s": head, "cache_bound": whole / head}


def xfer_launch(images: Path, weights: Path, res: int, epochs: int, seed: int, workdir: Path) -> dict:
    command = [sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs' / 'vgg16_cifar.py'}:res={res}",
               f"--config.init={weights}", "--config.data.source=folder", f"--config.data.path={images}",
               "--config.data.eval_split=val", f"--config.num_epochs={epochs}", f"--config.seed={seed}",
               f"--workdir={workdir}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((workdir / "summary.json").read_text())
    return {"side": "xfer", "seed": seed, "train_seconds": seconds, "accuracy": summary["eval_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1", help="comma-separated")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    import torch
    import torchvision

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        slice_images(args.data, scratch / "images", args.per_class, args.test_per_class)
        torch.manual_seed(1234)
        weights = scratch / "vgg16_random.pth"
        torch.save(torchvision.models.vgg16().state_dict(), weights)
        for seed in [int(s) for s in args.seeds.split(",")]:
            xfer = xfer_launch(scratch / "images", weights, args.res, args.epochs, seed, scratch / f"run{seed}")
            reference = torch_tutorial(scratch / "images", weights, args.res, args.epochs, seed)
            for row in (reference, xfer):
                print(json.dumps({**row, "res": args.res, "train_images": 10 * args.per_class}), flush=True)
            print(f"seed {seed}: xfer {reference['train_seconds'] / xfer['train_seconds']:.2f}x faster end to "
                  f"end; accuracy torch {reference['accuracy']:.3f}, xfer {xfer['accuracy']:.3f}", flush=True)
        bound = torch_step_bound(weights, args.res)
        print(json.dumps(bound), flush=True)
        print(f"bound: torch's step {bound['torch_step_s']:.3f} s, of which the classifier on cached features "
              f"{bound['torch_classifier_step_s']:.3f} s: the cache allows at most {bound['cache_bound']:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
