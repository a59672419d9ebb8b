"""The distillation losses as pure functions, and the plan that says which ones a config needs.

total = sum over the registry of alpha_<name> * L_<name>: DistilBERT's ce, mlm, cos (and the reference's mse on
logits); TinyBERT's embed, hidden and attn_scores (and attn, on probabilities); MobileBERT's hidden and attn_kl;
MiniLM's attn_kl and value_relation; MiniLMv2's query_relation, key_relation and value_relation.

A weight of 0 removes its term and everything only it needs: `LossPlan` derives from the registry
(`LOSS_TERMS`) which model outputs the training step computes (teacher logits, hidden states, the queries, keys
and values of the paired layers, the teacher at all). The metrics log and the report take their loss names
from the registry too. Layer-wise terms are summed over the layer pairs (TinyBERT's code sums them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """L_ce: KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over rows, times T^2.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mlm_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """L_mlm: cross-entropy of the student's logits at the masked positions against the original tokens."""
    return F.cross_entropy(student_logits.float(), labels)


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """L_cos: mean of 1 - cos(s, t) over rows (torch's CosineEmbeddingLoss with target +1)."""
    return (1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def logits_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L_mse: squared error between logits summed over the vocabulary, averaged over rows (the reference)."""
    return F.mse_loss(student_logits.float(), teacher_logits.float(), reduction="sum") / student_logits.size(0)


def hidden_mse_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]) -> Tensor:
    """L_hidden, L_embed (TinyBERT), feature-map transfer (MobileBERT): MSE between paired (already projected)
    states, summed over the pairs."""
    per_layer = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_states, teacher_states, strict=True)]
    return torch.stack(per_layer).sum()


def head_scores(queries: Tensor, keys: Tensor, heads: int) -> Tensor:
    """Scaled dot products [B, heads, L, L] of [B, L, d] queries and keys split into `heads` heads of d / heads:
    the pre-softmax attention scores of a layer (from its query and key projections), or a MiniLMv2 relation
    (queries with queries, keys with keys, values with values, in relation heads)."""
    if queries.size(-1) % heads:
        raise ValueError(f"width {queries.size(-1)} is not divisible into {heads} heads")
    q = queries.float().unflatten(-1, (heads, -1)).transpose(1, 2)
    k = keys.float().unflatten(-1, (heads, -1)).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))


def _masked_keys(scores: Tensor, attention_mask: Tensor) -> Tensor:
    """Scores with pad keys at the lowest float, so that a softmax gives them 0 (finite, unlike -inf)."""
    return scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)


def attention_probabilities(scores: Tensor, attention_mask: Tensor) -> Tensor:
    """softmax over the real keys: what the model's attention computes from these scores."""
    return _masked_keys(scores, attention_mask).softmax(dim=-1)


def attention_mse_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], attention_mask: Tensor
                       ) -> Tensor:
    """L_attn, L_attn_scores (TinyBERT): MSE between paired attention maps [B, heads, L, L] over real
    (query, key) pairs (pad positions zeroed, so they add nothing), summed over the pairs of layers."""
    pair_mask = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).float()  # [B, 1, L, L]
    per_layer = []
    for s, t in zip(student_maps, teacher_maps, strict=True):
        squared = (s.float() - t.float()).pow(2) * pair_mask
        per_layer.append(squared.sum() / (pair_mask.sum() * s.size(1)))
    return torch.stack(per_layer).sum()


def attention_kl_loss(student_scores: Sequence[Tensor], teacher_scores: Sequence[Tensor], attention_mask: Tensor
                      ) -> Tensor:
    """L_attn_kl (MobileBERT, MiniLM), and the relation terms: KL(teacher || student) between the distributions
    softmax(scores) over the real keys, per head and real query, averaged over heads and real queries, summed
    over the pairs of layers.

    A student with fewer heads than the teacher (dividing them) learns the mean distribution of each group of
    consecutive teacher heads: h_s = 4 against 12 averages teacher heads 0-2, 3-5, 6-8, 9-11.
    """
    queries = attention_mask[:, None, :].float()  # [B, 1, L]
    per_layer = []
    for s, t in zip(student_scores, teacher_scores, strict=True):
        student_heads, teacher_heads = s.size(1), t.size(1)
        if teacher_heads % student_heads:
            raise ValueError(f"{student_heads} student heads do not divide {teacher_heads} teacher heads")
        student_log_probs = F.log_softmax(_masked_keys(s.float(), attention_mask), dim=-1)
        teacher_probs = attention_probabilities(t.float(), attention_mask)
        teacher_probs = teacher_probs.unflatten(1, (student_heads, teacher_heads // student_heads)).mean(2)
        kl = (torch.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs).sum(-1)
        per_layer.append((kl * queries).sum() / (queries.sum() * student_heads))
    return torch.stack(per_layer).sum()


def relation_kl_loss(student_vectors: Sequence[Tensor], teacher_vectors: Sequence[Tensor], heads: int,
                     attention_mask: Tensor) -> Tensor:
    """L_{query,key,value}_relation (MiniLM, MiniLMv2): KL between the self-relations softmax(X_r X_r^T /
    sqrt(d_r)) of paired [B, L, d] vectors split into `heads` relation heads. Each model's relation heads are
    d / heads wide and the relations L x L, so the student's width and head count are free."""
    return attention_kl_loss([head_scores(s, s, heads) for s in student_vectors],
                             [head_scores(t, t, heads) for t in teacher_vectors], attention_mask)


def _target_logits(plan: LossPlan, student: Mapping, batch: Mapping) -> Tensor:
    """The student's logits at the MLM targets, whichever rows the plan computed logits at."""
    return student["logits"] if plan.logits_at_targets_only else student["logits"][batch["targets_in_tokens"]]


def _token_rows(states: Tensor, batch: Mapping) -> Tensor:
    """[B, L, d] -> [real tokens, d]."""
    return states.flatten(0, 1)[batch["token_rows"]]


def _scores(outputs: Mapping) -> list[Tensor]:
    """Pre-softmax attention scores of the paired layers, from their captured queries and keys."""
    return [head_scores(q, k, outputs["heads"]) for q, k in zip(outputs["query"], outputs["key"], strict=True)]


def _relation(kind: str) -> Callable[[LossPlan, Mapping, Mapping, Mapping], Tensor]:
    def compute(plan: LossPlan, s: Mapping, t: Mapping, batch: Mapping) -> Tensor:
        heads = plan.relation_heads or t["heads"]  # null: the teacher's attention heads (MiniLM)
        return relation_kl_loss(s[kind], t[kind], heads, batch["attention_mask"])
    return compute


@dataclass(frozen=True)
class LossTerm:
    """A registered loss: its pure function applied to the step's outputs, and the outputs it needs computed.

    Needs: "student_logits", "teacher_logits" (at the plan's logit rows), "teacher_hidden" (the teacher's last
    hidden states; the student's are always there), "embeddings" (both embedding outputs), "hidden_states"
    (both models' paired layer outputs) and "query", "key", "value" (what the paired layers' attention
    projections output, captured by hooks: attention maps only for the layers a loss uses).
    """

    name: str  # config key alpha_<name>, metrics key loss_<name>
    needs: frozenset[str]
    compute: Callable[[LossPlan, Mapping, Mapping | None, Mapping], Tensor]  # (plan, student, teacher, batch)

    @property
    def layerwise(self) -> bool:
        """Computed on the layer pairs (what a progressive-transfer stage trains one layer at a time)."""
        return bool(self.needs & LAYER_NEEDS)


LAYER_NEEDS = frozenset({"hidden_states", "query", "key", "value"})
# Outputs that only a teacher can give.
TEACHER_NEEDS = frozenset({"teacher_logits", "teacher_hidden", "embeddings"}) | LAYER_NEEDS
ATTENTION_PROJECTIONS = ("query", "key", "value")

# The registry, in the order the terms are computed and summed. Adding a loss = its pure function above, one
# entry here and its `alpha_<name>` key in conf/loss/.
LOSS_TERMS: dict[str, LossTerm] = {term.name: term for term in (
    LossTerm("mlm", frozenset({"student_logits"}),
             lambda plan, s, t, batch: mlm_loss(_target_logits(plan, s, batch), batch["target_labels"])),
    LossTerm("ce", frozenset({"student_logits", "teacher_logits"}),
             lambda plan, s, t, batch: soft_target_loss(s["logits"], t["logits"], plan.temperature)),
    LossTerm("mse", frozenset({"student_logits", "teacher_logits"}),
             lambda plan, s, t, batch: logits_mse_loss(s["logits"], t["logits"])),
    LossTerm("cos", frozenset({"teacher_hidden"}),
             lambda plan, s, t, batch: cosine_loss(_token_rows(s["last_hidden"], batch),
                                                   _token_rows(t["last_hidden"], batch))),
    LossTerm("embed", frozenset({"embeddings"}),
             lambda plan, s, t, batch: hidden_mse_loss([_token_rows(s["embeddings"], batch)],
                                                       [_token_rows(t["embeddings"], batch)])),
    LossTerm("hidden", frozenset({"hidden_states"}),
             lambda plan, s, t, batch: hidden_mse_loss([_token_rows(x, batch) for x in s["hidden_states"]],
                                                       [_token_rows(x, batch) for x in t["hidden_states"]])),
    LossTerm("attn", frozenset({"query", "key"}),
             lambda plan, s, t, batch: attention_mse_loss(
                 [attention_probabilities(x, batch["attention_mask"]) for x in _scores(s)],
                 [attention_probabilities(x, batch["attention_mask"]) for x in _scores(t)], batch["attention_mask"])),
    LossTerm("attn_scores", frozenset({"query", "key"}),
             lambda plan, s, t, batch: attention_mse_loss(_scores(s), _scores(t), batch["attention_mask"])),
    LossTerm("attn_kl", frozenset({"query", "key"}),
             lambda plan, s, t, batch: attention_kl_loss(_scores(s), _scores(t), batch["attention_mask"])),
    LossTerm("query_relation", frozenset({"query"}), _relation("query")),
    LossTerm("key_relation", frozenset({"key"}), _relation("key")),
    LossTerm("value_relation", frozenset({"value"}), _relation("value")),
)}


@dataclass(frozen=True)
class LossPlan:
    """The loss weights, their settings and what they need computed."""

    weights: Mapping[str, float]  # LOSS_TERMS name -> alpha
    temperature: float
    restrict_ce_to_mask: bool
    teacher_layer: int | None  # None: every student layer paired; else the student's last with this one
    relation_heads: int | None  # None: the teacher's attention heads

    @classmethod
    def from_config(cls, loss_cfg) -> LossPlan:
        """The plan of a (schema-checked) `loss` config section."""
        weights = {name: getattr(loss_cfg, f"alpha_{name}") for name in LOSS_TERMS}
        return cls(weights, loss_cfg.temperature, loss_cfg.restrict_ce_to_mask, loss_cfg.teacher_layer,
                   loss_cfg.relation_heads)

    def uses(self, name: str) -> bool:
        return self.weights[name] > 0

    def only(self, layerwise: bool) -> LossPlan:
        """The plan of the layer-wise terms (or of the others) alone: a progressive-transfer stage's."""
        return replace(self, weights={name: weight if LOSS_TERMS[name].layerwise == layerwise else 0.0
                                      for name, weight in self.weights.items()})

    @property
    def used(self) -> list[str]:
        return [name for name in LOSS_TERMS if self.uses(name)]

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(LOSS_TERMS[name].needs for name in self.used))

    @property
    def teacher_logits(self) -> bool:
        return "teacher_logits" in self.needs

    @property
    def student_logits(self) -> bool:
        return "student_logits" in self.needs

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs & TEACHER_NEEDS)

    @property
    def embeddings(self) -> bool:
        return "embeddings" in self.needs

    @property
    def hidden_states(self) -> bool:
        return "hidden_states" in self.needs

    @property
    def projections(self) -> tuple[str, ...]:
        """The attention projections (query, key, value) whose outputs the paired layers must give."""
        return tuple(kind for kind in ATTENTION_PROJECTIONS if kind in self.needs)

    @property
    def logits_at_targets_only(self) -> bool:
        """Logits are needed at the masked positions only: for L_mlm alone, or with restrict_ce_to_mask."""
        return self.restrict_ce_to_mask or not self.teacher_logits


def compute_losses(plan: LossPlan, student: Mapping, teacher: Mapping | None, batch: Mapping) -> dict[str, Tensor]:
    """Every loss term the plan uses, and their weighted sum as "loss".

    `student` / `teacher` hold what the models computed for this plan: "logits" at the rows given by
    `plan.logits_at_targets_only` (batch["target_rows"], else batch["token_rows"]), "last_hidden"
    [B, L, d], "embeddings" and the paired "hidden_states", "query", "key", "value" lists and the models'
    attention "heads" when the plan uses them.
    """
    losses = {name: LOSS_TERMS[name].compute(plan, student, teacher, batch) for name in plan.used}
    losses["loss"] = sum(plan.weights[name] * value for name, value in losses.items())
    return losses
