"""Held-out masked-LM loss and accuracy on fixed masks, so that every model evaluated on a run (the student, its
baselines, the teacher) is scored on the same targets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from distilbert_cli.training.batches import derived_seed, to_device
from distilbert_cli.training.distiller import MaskedLMRows
from distilbert_cli.training.masking import MaskingSpec, collate_masked


def validation_batches(dataset, spec: MaskingSpec, max_sequences: int, batch_size: int, seed: int) -> list[dict]:
    """Fixed masked batches of the validation split: the first `max_sequences` sequences sorted by length,
    masks drawn from (seed, batch number), so every model evaluated on a run sees the same targets."""
    count = min(max_sequences, len(dataset))
    lengths = np.asarray(dataset.with_format("numpy")["length"][:count])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for number, start in enumerate(range(0, count, batch_size)):
        sequences = dataset[order[start:start + batch_size].tolist()]["input_ids"]
        batches.append(collate_masked(sequences, spec, torch.Generator().manual_seed(derived_seed(seed, number))))
    return batches


@torch.no_grad()
def score_targets(model: nn.Module, batches: Iterable[dict], device: torch.device,
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, np.ndarray]:
    """Every MLM target of `batches`, in order: its label, the model's cross-entropy there and its top-1 prediction
    (so that two models scored on the same batches can be compared target by target)."""
    was_training = model.training
    model.eval()
    rows_model = MaskedLMRows(model)
    labels, losses, predictions = [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            logits = rows_model(batch["input_ids"], batch["attention_mask"], batch["target_rows"])["logits"].float()
        losses.append(torch.nn.functional.cross_entropy(logits, batch["target_labels"], reduction="none").cpu())
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch["target_labels"].cpu())
    model.train(was_training)
    return {"labels": torch.cat(labels).numpy(), "losses": torch.cat(losses).numpy(),
            "predictions": torch.cat(predictions).numpy()}


def mlm_figures(scored: dict[str, np.ndarray]) -> dict[str, float]:
    """MLM loss (mean cross-entropy over all targets) and accuracy of scored targets."""
    return {"mlm_loss": float(np.mean(scored["losses"], dtype=np.float64)),
            "mlm_accuracy": float(np.mean(scored["predictions"] == scored["labels"]))}


def evaluate_mlm(model: nn.Module, batches: Iterable[dict], device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """MLM loss (mean cross-entropy over all targets) and accuracy of a masked LM on masked `batches`."""
    return mlm_figures(score_targets(model, batches, device, autocast))
