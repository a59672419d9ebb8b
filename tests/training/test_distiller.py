"""Which (student, teacher) layers the hidden-state and attention losses pair."""

from __future__ import annotations

import pytest

from distilbert_cli.models.student import select_layers
from distilbert_cli.training.distiller import layer_pairs


@pytest.mark.parametrize("layer_map", [None, [None] * 5, [0, 1, 2]])  # no map, a random student, a map of 3 layers
def test_without_a_usable_layer_map_12_to_5_pairs_like_init_uniform(layer_map):
    # floor((i + 1) * 12 / 5) - 1 = [1, 3, 6, 8, 11]: the teacher layers init=uniform copies (round: [1, 4, 6, 9, 11])
    assert layer_pairs(5, 12, layer_map) == [(0, 1), (1, 3), (2, 6), (3, 8), (4, 11)]
    assert [t for _, t in layer_pairs(5, 12, layer_map)] == select_layers("uniform", 12, 5)


def test_a_student_initialised_from_teacher_layers_is_paired_with_them():
    assert layer_pairs(3, 12, [0, 5, 11]) == [(0, 0), (1, 5), (2, 11)]
    assert layer_pairs(6, 12, select_layers("every_other", 12, 6)) == [(0, 0), (1, 2), (2, 4), (3, 7), (4, 9),
                                                                       (5, 11)]
