"""Tang et al.'s BiLSTM student: output shapes for single texts and pairs, pooling that ignores padding (and the
framing tokens), a separable toy task learned to > 95%, the PCA projection of the teacher's embeddings, and the
Auto classes loading a saved checkpoint."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from distilbert_cli.models.bilstm import (
    BiLSTMConfig,
    BiLSTMForSequenceClassification,
    BiLSTMModel,
    projected_embeddings,
)

PAD, CLS, SEP = 0, 2, 3


def config(**sizes) -> BiLSTMConfig:
    return BiLSTMConfig(vocab_size=30, embedding_size=12, hidden_size=8, classifier_size=10, dropout=0.0,
                        pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, **sizes)


def batch(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    return ids, (ids != PAD).long()


def test_shapes_for_single_texts_and_pairs():
    torch.manual_seed(0)
    model = BiLSTMForSequenceClassification(config(num_labels=3)).eval()
    single = batch([CLS, 5, 6, 7, SEP], [CLS, 8, SEP])
    pairs = batch([CLS, 5, 6, SEP, 9, 10, 11, SEP], [CLS, 8, SEP, 12, SEP])
    assert model(*single).logits.shape == (2, 3) and model(*pairs).logits.shape == (2, 3)
    pooled = model.bilstm(*pairs).last_hidden_state
    assert pooled.shape == (2, 2, 16)  # [batch, first and second text, 2 directions x hidden]
    assert torch.equal(model.bilstm(*single).last_hidden_state[:, 1], torch.zeros(2, 16))  # no second text: 0


def test_padding_and_framing_tokens_change_nothing():
    torch.manual_seed(0)
    model = BiLSTMForSequenceClassification(config(num_labels=2)).eval()
    ids, mask = batch([CLS, 5, 6, SEP, 9, 10, SEP], [CLS, 7, SEP, 11, SEP])
    padded = torch.cat([ids, torch.full((2, 6), PAD)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids, mask).logits, model(padded, (padded != PAD).long()).logits, atol=1e-6)
        # The first text is read the same alone as within a longer batch, and as a pair's first text it differs
        # only by its partner.
        alone = model.bilstm(*batch([CLS, 5, 6, SEP])).last_hidden_state[0, 0]
        assert torch.allclose(alone, model.bilstm(ids, mask).last_hidden_state[0, 0], atol=1e-6)


def test_learns_a_separable_toy_task():
    """Class 1 if token 7 occurs anywhere in a random text of 3 to 8 tokens, else class 0."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)

    def sample(count: int):
        rows, labels = [], []
        for _ in range(count):
            length = int(torch.randint(3, 9, (1,), generator=generator))
            tokens = torch.randint(8, 30, (length,), generator=generator).tolist()
            if torch.rand(1, generator=generator) < 0.5:
                tokens[int(torch.randint(0, length, (1,), generator=generator))] = 7
            rows.append([CLS, *tokens, SEP])
            labels.append(int(7 in tokens))
        return (*batch(*rows), torch.tensor(labels))

    model = BiLSTMForSequenceClassification(config(num_labels=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        ids, mask, labels = sample(32)
        loss = torch.nn.functional.cross_entropy(model(ids, mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ids, mask, labels = sample(500)
    with torch.no_grad():
        accuracy = (model.eval()(ids, mask).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.95


def test_pca_keeps_the_top_components():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6))[0]
    embeddings = (torch.randn(500, 6) * torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])) @ basis.T + 2.0
    projected = projected_embeddings(embeddings, 3)
    assert projected.shape == (500, 3)
    variances = projected.var(dim=0)
    assert variances[0] > variances[1] > variances[2] > 0.5  # the three large directions, largest first
    # Projecting keeps almost all the variance: the dropped directions held 0.03 of 35.
    assert variances.sum() / (embeddings - embeddings.mean(0)).var(dim=0).sum() > 0.99
    assert torch.equal(projected_embeddings(embeddings, 6), embeddings)


def test_the_auto_classes_load_a_saved_encoder_with_a_task_head(tmp_path):
    torch.manual_seed(0)
    encoder = BiLSTMModel(config())
    encoder.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is BiLSTMModel and torch.equal(loaded.embeddings.weight, encoder.embeddings.weight)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert type(classifier) is BiLSTMForSequenceClassification
    assert torch.equal(classifier.bilstm.forward_lstm.weight_hh_l0, encoder.forward_lstm.weight_hh_l0)
    assert classifier.classifier[-1].out_features == 4
