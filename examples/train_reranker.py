"""Train a reranker (cross-encoder) on a hardneg output with sentence-transformers' trainer.

    hardneg mine --beir examples/cranfield --out out/cranfield-pairs --positives best --format labeled-pair
    python examples/train_reranker.py out/cranfield-pairs --output-dir models/reranker
    hardneg mine --beir examples/cranfield --out out/cranfield-lists --positives best --format labeled-list
    python examples/train_reranker.py out/cranfield-lists --output-dir models/reranker

The loss follows the output's format: `labeled-pair` rows (query, passage, label 1/0) train with
BinaryCrossEntropyLoss, pointwise; `labeled-list` rows (query, [positive, negatives ...],
[1, 0, ...]) with LambdaLoss, listwise (it optimises NDCG over each query's list). The default
model is a fresh one-logit head on all-MiniLM-L6-v2's encoder (packaged, so it runs offline);
pass --model for a real reranker to fine-tune.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recipe_data import default_model, training_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a folder `hardneg mine` wrote (labeled-pair or labeled-list format)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="cross-encoder (or encoder) to train: local path or hub id")
    parser.add_argument("--output-dir", default="models/reranker")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (a labeled-list row is a whole list)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per (query, passage) pair")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=12)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, fmt = training_rows(args.dataset, ("labeled-pair", "labeled-list"), "--format labeled-pair or labeled-list for a reranker")
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, LambdaLoss

    model = CrossEncoder(default_model(args.model), num_labels=1, max_length=args.max_length)
    loss = BinaryCrossEntropyLoss(model) if fmt == "labeled-pair" else LambdaLoss(model)
    training_args = CrossEncoderTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_ratio=0.1,
        seed=args.seed, save_strategy="no", logging_steps=10, report_to="none",
    )
    trainer = CrossEncoderTrainer(model=model, args=training_args, train_dataset=train, loss=loss)
    result = trainer.train()
    model.save(args.output_dir)
    loss_value = result.training_loss
    print(f"trained {result.global_step} steps on {train.num_rows} rows ({fmt}, {type(loss).__name__}): "
          f"train_loss={loss_value:.4f}; saved to {args.output_dir}")
    if not math.isfinite(loss_value):
        sys.exit("error: the training loss is not finite")


if __name__ == "__main__":
    main()
