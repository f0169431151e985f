"""Train a bi-encoder on a hardneg output with sentence-transformers' trainer.

    hardneg mine --beir examples/cranfield --out out/cranfield --positives best --num-negatives 5
    python examples/train_bi_encoder.py out/cranfield --output-dir models/bi-encoder
    python examples/train_bi_encoder.py out/cranfield --loss cached-mnrl --batch-size 256 --mini-batch-size 32
    python examples/train_bi_encoder.py out/cranfield --loss guided-mnrl --batch-size 16

The output's `n-tuple` rows (query, positive, negative_1 ... negative_K; `triplet` works too)
feed MultipleNegativesRankingLoss: each query is scored against its positive, its K hard
negatives and every other text of the batch. `--loss cached-mnrl` is its GradCache variant
(CachedMultipleNegativesRankingLoss), whose batch size is bounded by time, not memory.
`--loss guided-mnrl` is for a one-topic collection, where another query's positive in the batch is
often relevant to this query too: a frozen copy of the starting model masks the in-batch texts it
scores above the pair's positive, while the pair's own mined negatives always count
(_recipe_losses.py; the recipe hardneg's training benchmark uses). The
NO_DUPLICATES sampler keeps a text from appearing twice in a batch, where it would be an in-batch
"negative" of itself (common with `--positives all`, one row per judged positive).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recipe_data import default_model, training_rows  # noqa: E402
from _recipe_losses import guided_in_batch_loss  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a folder `hardneg mine` wrote (n-tuple or triplet format)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="bi-encoder to fine-tune: local path or hub id")
    parser.add_argument("--loss", choices=["mnrl", "cached-mnrl", "guided-mnrl"], default="mnrl")
    parser.add_argument("--output-dir", default="models/bi-encoder")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=16, help="cached-mnrl: texts per forward pass")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=12)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, fmt = training_rows(args.dataset, ("n-tuple", "triplet"), "--format n-tuple (or triplet) for a bi-encoder")
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(default_model(args.model))
    if args.loss == "mnrl":
        loss = MultipleNegativesRankingLoss(model)
    elif args.loss == "guided-mnrl":
        guide = SentenceTransformer(default_model(args.model))
        guide.requires_grad_(False)
        loss = guided_in_batch_loss(model, guide)
    else:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_ratio=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES, seed=args.seed, save_strategy="no", logging_steps=10,
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train, loss=loss)
    result = trainer.train()
    model.save(args.output_dir)
    loss_value = result.training_loss
    print(f"trained {result.global_step} steps on {train.num_rows} rows ({fmt}, {args.loss}): "
          f"train_loss={loss_value:.4f}; saved to {args.output_dir}")
    if not math.isfinite(loss_value):
        sys.exit("error: the training loss is not finite")


if __name__ == "__main__":
    main()
