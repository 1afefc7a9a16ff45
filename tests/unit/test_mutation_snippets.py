"""The guard-mutation check's snippets still match the code: a refactor that moves a guard must move its
mutation too, and finding that out here costs a second, not the end of a CI run."""

from __future__ import annotations

import pytest

from tests.mutation_check import MUTATIONS, REPO, Mutation


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_snippet_occurs_exactly_once(mutation: Mutation) -> None:
    text = (REPO / mutation.path).read_text()
    assert text.count(mutation.find) == 1, f"{mutation.name}: snippet not found once in {mutation.path}"
    assert mutation.replace != mutation.find
