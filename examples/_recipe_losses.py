"""A bi-encoder loss for mined negatives in a topic-dense collection, shared by the training recipe
(train_bi_encoder.py --loss guided-mnrl) and benchmarks/train_effect.py (its frozen recipe).

MultipleNegativesRankingLoss treats every other text of the batch as a negative; in a one-topic
collection another query's positive is often relevant to this query too, and training pushes it
away. GISTEmbedLoss fixes that with a frozen guide model that masks the candidates it scores above
the pair's positive, but it masks the pair's *own mined negatives* the same way: with the base
model as the guide, that is a false-negative filter of its own over the negatives you mined (the
ones the base model ranks above the positive), which hides what a miner's false negatives cost.
`guided_in_batch_loss` masks the in-batch candidates only: each row's own mined negatives always
count, as in MultipleNegativesRankingLoss. benchmarks/RESULTS.md ("a recipe that lets the mined
negatives count") has the measurements.
"""

from __future__ import annotations


def guided_in_batch_loss(model, guide, temperature: float = 0.05):
    """GISTEmbedLoss over (anchor, positive, negative_1..k) whose guide masks only the in-batch
    candidates (other rows' positives and negatives, the anchors and positives themselves, as
    GISTEmbedLoss contrasts them); a row's own negatives are never masked. One process, and a
    guide that tokenizes as the model does (a frozen copy of the model being trained)."""
    import torch
    from sentence_transformers import losses

    try:  # sentence-transformers 6: the columns in one forward pass, as its own losses embed them
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        def embed_columns(encoder, features):
            return [encoder(f)["sentence_embedding"] for f in features]

    class GuidedInBatchLoss(losses.GISTEmbedLoss):
        def forward(self, sentence_features, labels):
            features = list(sentence_features)
            guide_features = [dict(f) for f in features]  # a model writes its outputs into what it is given
            anchor, positive, *negatives = embed_columns(self.model, features)
            with torch.no_grad():
                g_anchor, g_positive, *g_negatives = embed_columns(self.guide, guide_features)
            rows = torch.arange(anchor.size(0), device=anchor.device)
            threshold = self.sim_matrix(g_anchor, g_positive).diagonal().view(-1, 1)

            def masked(a, b, g_a, g_b, diagonal: str):
                sim = self.sim_matrix(a, b)
                mask = self.sim_matrix(g_a, g_b) > threshold
                mask[rows, rows] = False  # the row's own positive or mined negative: never masked
                sim[mask] = -torch.inf
                if diagonal == "self":  # an anchor or positive is no negative of itself
                    sim[rows, rows] = -torch.inf
                return sim

            scores = [masked(anchor, positive, g_anchor, g_positive, "own"),
                      masked(anchor, anchor, g_anchor, g_anchor, "self"),
                      masked(positive, positive, g_positive, g_positive, "self")]
            scores += [masked(anchor, n, g_anchor, g_n, "own") for n, g_n in zip(negatives, g_negatives)]
            return self.cross_entropy_loss(torch.cat(scores, dim=1) / self.temperature, rows)

    return GuidedInBatchLoss(model, guide, temperature=temperature)
