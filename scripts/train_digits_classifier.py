"""Train the digits classifier used as a domain FID feature space (assets/classifiers/digits-classifier).

    python scripts/train_digits_classifier.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlkd.data import build_dataset
from vlkd.eval.digits_classifier import DigitsClassifier, default_classifier_dir
from vlkd.files import staged_folder, write_json


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to one pixel, so features do not hinge on exact placement."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_classifier_dir()))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = build_dataset("digits:16", split=split)
        samples = [data[i] for i in range(len(data))]
        return torch.stack([s["pixel_values"] for s in samples]), torch.tensor([s["label"] for s in samples])

    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    # Train on uint8-quantised images: the harness quantises every image before features.
    x_train = ((x_train + 1) * 127.5).round() / 127.5 - 1
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(shift(x_train[idx], generator)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    with staged_folder(args.out, overwrite=args.overwrite) as folder:
        save_file(model.state_dict(), folder / "model.safetensors")
        write_json(folder / "config.json", {"image_size": 16, "num_classes": 10, "feature_dim": 128})
        write_json(folder / "metrics.json", {
            "test_accuracy": round(accuracy, 4), "test_images": len(x_test), "epochs": args.epochs,
            "seed": args.seed, "training_seconds": round(time.time() - start, 1),
            "command": "python scripts/train_digits_classifier.py",
        })
    print(f"test accuracy {accuracy:.4f} on {len(x_test)} digits; wrote {args.out}")


if __name__ == "__main__":
    main()
