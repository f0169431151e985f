"""Token ids to the padded arrays a transformer is fed, shared by the torch and OpenVINO engines."""

from __future__ import annotations

import numpy as np


def padding_of(tokenizer) -> tuple[dict[str, int], bool]:
    """A Hugging Face tokenizer's pad value of each feature, and whether it pads on the left."""
    pad = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}
    return pad, getattr(tokenizer, "padding_side", "right") == "left"


def pad_features(encoded: dict[str, list[list[int]]], rows, length: int, pad_values: dict[str, int],
                 left: bool = False) -> dict[str, np.ndarray]:
    """What `tokenizer(texts, padding="max_length", max_length=length)` returns for these rows
    (each at most `length` tokens), as int64 arrays, built from their ids."""
    features = {}
    for key, values in encoded.items():
        array = np.full((len(rows), length), pad_values.get(key, 0), dtype=np.int64)
        for i, row in enumerate(rows):
            ids = values[row]
            if left:
                array[i, length - len(ids):] = ids
            else:
                array[i, :len(ids)] = ids
        features[key] = array
    return features
