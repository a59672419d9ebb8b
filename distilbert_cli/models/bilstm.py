"""Tang et al. (2019)'s task student: a single-layer BiLSTM over word-piece embeddings, max-pooled, with a
non-linear classifier; sentence pairs go through the same (siamese) BiLSTM and meet as [h1, h2, h1 * h2, |h1 - h2|].

The classes are transformers models (a config with `model_type` "distil_bilstm", registered with the Auto
classes when this module is imported), so finetune, the evaluation stage, task-distill and bench-cpu load,
save and time a BiLSTM checkpoint like any other: `BiLSTMModel` is the encoder init-student saves,
`BiLSTMForSequenceClassification` adds the task head.

Inputs are the teacher tokenizer's ids (its vocabulary, so the teacher's embeddings can initialise it). The
special tokens that frame an input ([CLS], [SEP], padding) are not read: the first text is what precedes the first
separator, the second what follows it. One classifier serves single texts and pairs: a single text is a pair
whose second text is empty (h2 = 0), so its features are [h1, 0, 0, |h1|] (Tang et al. feed h1 alone; the
classifier can weigh the other blocks 0).

Padding never changes an output: each text is packed to the left of its own tensor, the backward LSTM reads
each row reversed within its length, and pooling ignores the positions past it. Only tensor ops that ONNX
export (gather, sort, LSTM), so bench-cpu's ONNX backends time it too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

MODEL_TYPE = "distil_bilstm"
# LSTM outputs are o * tanh(c), inside (-1, 1): a position filled with this never wins a max.
_BELOW_ANY_OUTPUT = -2.0


class BiLSTMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 30522, embedding_size: int = 300, hidden_size: int = 150,
                 classifier_size: int = 200, dropout: float = 0.1, pad_token_id: int = 0,
                 cls_token_id: int | None = None, sep_token_id: int | None = None, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.hidden_size = hidden_size  # per direction
        self.classifier_size, self.dropout = classifier_size, dropout
        self.cls_token_id, self.sep_token_id = cls_token_id, sep_token_id

    @property
    def num_hidden_layers(self) -> int:  # what tables of model sizes print: one BiLSTM layer
        return 1


class BiLSTMPreTrainedModel(PreTrainedModel):
    config_class = BiLSTMConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"


def _packed_left(input_ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each row moved to its start, in order, cut to the longest row (at least one position),
    and how many each row has."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    # Kept positions sort first (their key is their position), the others after them: a stable compaction.
    order = torch.argsort(torch.where(keep, positions, positions + input_ids.size(1)), dim=1)
    lengths = keep.sum(1)
    return input_ids.gather(1, order)[:, :lengths.max().clamp(min=1)], lengths


class BiLSTMModel(BiLSTMPreTrainedModel):
    """Embeddings and the BiLSTM: `forward` gives the max-pooled states of the first text and of the second."""

    def __init__(self, config: BiLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.forward_lstm = nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True)
        self.backward_lstm = nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] tokens packed left, `lengths` of them real -> [B, 2 * hidden] max-pooled BiLSTM states (0 for an
        empty text)."""
        positions = torch.arange(tokens.size(1), device=tokens.device)[None]
        real = positions < lengths[:, None]
        embedded = self.embeddings(tokens)
        forward_states, _ = self.forward_lstm(embedded)
        # Reverse each row within its length (the map is its own inverse), so the backward LSTM starts at the last
        # real token whatever padding follows.
        reverse = torch.where(real, lengths[:, None] - 1 - positions, positions)[..., None]
        backward_states, _ = self.backward_lstm(embedded.gather(1, reverse.expand_as(embedded)))
        backward_states = backward_states.gather(1, reverse.expand_as(backward_states))
        states = torch.cat([forward_states, backward_states], dim=-1)
        pooled = states.masked_fill(~real[..., None], _BELOW_ANY_OUTPUT).amax(dim=1)
        return torch.where(lengths[:, None] > 0, pooled, torch.zeros_like(pooled))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> BaseModelOutputWithPooling:
        """The pooled first text as `pooler_output`; `last_hidden_state` holds both texts' [B, 2, 2 * hidden]."""
        content = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        for framing in (self.config.pad_token_id, self.config.cls_token_id, self.config.sep_token_id):
            if framing is not None:
                content = content & (input_ids != framing)
        separators = input_ids == self.config.sep_token_id if self.config.sep_token_id is not None else content & False
        after_separator = separators.long().cumsum(dim=1) > 0
        texts = [self.encode(*_packed_left(input_ids, content & side)) for side in (~after_separator, after_separator)]
        return BaseModelOutputWithPooling(last_hidden_state=torch.stack(texts, dim=1), pooler_output=texts[0])


class BiLSTMForSequenceClassification(BiLSTMPreTrainedModel):
    """The BiLSTM, [h1, h2, h1 * h2, |h1 - h2|], dropout, a ReLU layer of `classifier_size`, the output layer."""

    def __init__(self, config: BiLSTMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bilstm = BiLSTMModel(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(8 * config.hidden_size, config.classifier_size), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.classifier_size, config.num_labels))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> SequenceClassifierOutput:
        first, second = self.bilstm(input_ids, attention_mask).last_hidden_state.unbind(dim=1)
        features = torch.cat([first, second, first * second, (first - second).abs()], dim=-1)
        return SequenceClassifierOutput(logits=self.classifier(features))


def bilstm_config(tokenizer, vocab_size: int, settings) -> BiLSTMConfig:
    """The config of a BiLSTM over `tokenizer`'s ids (`vocab_size` embedding rows) sized by a `student` config
    section (student=bilstm)."""
    return BiLSTMConfig(vocab_size=vocab_size, embedding_size=settings.embedding_size,
                        hidden_size=settings.hidden_size, classifier_size=settings.classifier_size,
                        dropout=settings.dropout, pad_token_id=tokenizer.pad_token_id,
                        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)


def projected_embeddings(embeddings: torch.Tensor, size: int) -> torch.Tensor:
    """[V, d] embeddings projected onto their `size` principal components (PCA: centred, then the top
    eigenvectors of their covariance), [V, size]; `size` = d keeps them as they are."""
    if size > embeddings.size(1):
        raise ValueError(f"cannot project {embeddings.size(1)}-wide embeddings up to {size}")
    if size == embeddings.size(1):
        return embeddings.clone()
    centred = embeddings.double() - embeddings.double().mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
    return (centred @ vectors[:, -size:].flip(-1)).to(embeddings.dtype)


AutoConfig.register(MODEL_TYPE, BiLSTMConfig)
AutoModel.register(BiLSTMConfig, BiLSTMModel)
AutoModelForSequenceClassification.register(BiLSTMConfig, BiLSTMForSequenceClassification)
