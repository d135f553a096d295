"""The zoo's task generators: labels, scored positions and probe variables against slow per-sequence Python."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saelab.errors import SaelabError
from saelab.models.zoo.tasks import IGNORE, TASKS, caesar_text, get_task, trigram_table

SEEDS = st.integers(0, 2**31 - 1)
SIZES = st.integers(1, 24)


def rows(batch):
    """Plain Python lists per sequence: tokens, labels, scored, judged, variable, variable_mask."""
    return zip(
        batch.tokens.tolist(),
        batch.labels.tolist(),
        batch.scored.tolist(),
        batch.judged.tolist(),
        batch.variable.tolist(),
        batch.variable_mask.tolist(),
        strict=True,
    )


def check_common(task, batch, n):
    assert batch.tokens.shape == (n, task.n_ctx)
    assert batch.tokens.dtype == torch.long
    assert batch.tokens.min() >= 0 and batch.tokens.max() < len(task.vocab)
    assert (batch.judged <= batch.scored).all()
    assert ((batch.labels == IGNORE) == ~batch.scored).all()
    scored_labels = batch.labels[batch.scored]
    assert scored_labels.min() >= 0 and scored_labels.max() < len(task.outputs)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_palindromes(seed, n):
    task = get_task("palindromes")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, _, variable, var_mask in rows(batch):
        words = [task.vocab[t] for t in tokens]
        assert words[0] == "START" and words[-1] == "END"
        values = [int(w) for w in words[1:-1]]
        assert len(values) == 20 and all(0 <= v <= 30 for v in values)
        assert scored == [False] * 21 + [True]
        assert labels[-1] == (1 if values == values[::-1] else 0)
        for i in range(1, 21):
            assert var_mask[i] and variable[i] == int(values[i - 1] == values[20 - i])
        assert not var_mask[0] and not var_mask[21]


def test_palindromes_are_half_the_samples_and_the_rest_are_near_misses():
    batch = get_task("palindromes").sample(4000, 0)
    is_palindrome = batch.labels[:, -1].float()
    assert 0.47 < is_palindrome.mean() < 0.53
    mismatched_pairs = (1 - batch.variable[:, 1:11].float()).sum(1)[is_palindrome == 0]
    assert (mismatched_pairs == 1).float().mean() > 0.05  # one-place differences are common


def first_unique_slow(letters):
    for letter in letters:
        if letters.count(letter) == 1:
            return letter
    return None


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_unique_char(seed, n):
    task = get_task("unique_char")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, judged, variable, var_mask in rows(batch):
        words = [task.vocab[t] for t in tokens]
        assert words[0] == "START" and all(w in "abcdefghij" for w in words[1:])
        assert scored == judged == var_mask == [False] + [True] * 19
        for p in range(1, 20):
            answer = first_unique_slow(words[1 : p + 1])
            assert task.outputs[labels[p]] == ("none" if answer is None else answer)
            assert variable[p] == int(words[p] in words[1:p])


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_sum(seed, n):
    task = get_task("sum")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, _, variable, var_mask in rows(batch):
        words = [task.vocab[t] for t in tokens]
        assert words[4] == "+" and words[9] == "="
        # Little-endian: the first digit written is the ones digit.
        a = int("".join(reversed(words[0:4])))
        b = int("".join(reversed(words[5:9])))
        c = int("".join(reversed(words[10:14])))
        assert c == (a + b) % 10000
        assert scored == [p in (9, 10, 11, 12) for p in range(14)]
        for p in range(9, 13):
            assert labels[p] == tokens[p + 1]
        # Carry into digit i by long addition, digit by digit.
        carry, carries = 0, []
        for i in range(4):
            carries.append(carry)
            carry = (int(words[i]) + int(words[5 + i]) + carry) // 10
        for i in range(1, 4):
            assert var_mask[9 + i] and variable[9 + i] == carries[i]
        assert sum(var_mask) == 3


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_sorted_list(seed, n):
    task = get_task("sorted_list")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, _, variable, var_mask in rows(batch):
        words = [task.vocab[t] for t in tokens]
        assert words[10] == "SEP"
        values = [int(w) for w in words[:10]]
        assert len(set(values)) == 10 and all(0 <= v <= 50 for v in values)
        assert [int(w) for w in words[11:]] == sorted(values)
        assert scored == [10 <= p < 20 for p in range(21)]
        for p in range(10, 20):
            assert labels[p] == tokens[p + 1]
        for p in range(11, 20):
            assert var_mask[p] and variable[p] == int(int(words[p + 1]) == int(words[p]) + 1)
        assert sum(var_mask) == 9


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_cumsum(seed, n):
    task = get_task("cumsum")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, _, variable, _ in rows(batch):
        values = [int(task.vocab[t]) for t in tokens]
        assert all(-5 <= v <= 5 for v in values)
        assert all(scored)
        total = 0
        for p, v in enumerate(values):
            total += v
            assert variable[p] == total
            assert task.outputs[labels[p]] == ("negative" if total < 0 else "zero" if total == 0 else "positive")


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_caesar(seed, n):
    task = get_task("caesar")
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    text = "".join(alphabet[i] if i < 26 else " " for i in caesar_text("train").tolist())
    for tokens, labels, scored, _, variable, _ in rows(batch):
        assert all(scored) and len(set(labels)) == 1
        shift = int(task.outputs[labels[0]])
        cipher = "".join(" " if task.vocab[t] == "_" else task.vocab[t] for t in tokens)
        plain = "".join(c if c == " " else alphabet[(alphabet.index(c) - shift) % 26] for c in cipher)
        assert plain in text  # a window of the plaintext, deciphered by the label's shift
        assert "".join(task.probe.classes[v] for v in variable).replace("_", " ") == plain


def test_caesar_text_is_english_comments_and_splits_differ():
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    train = "".join(alphabet[i] for i in caesar_text("train")[:200000].tolist())
    counts = {c: train.count(c) for c in alphabet[:26]}
    assert max(counts, key=counts.get) == "e"
    assert " the " in train and "  " not in train
    heldout = "".join(alphabet[i] for i in caesar_text("heldout")[:2000].tolist())
    assert heldout[:500] not in train


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_trigrams(seed, n):
    task = get_task("trigrams")
    table = [tuple(row) for row in trigram_table().tolist()]
    completion = {(a, b): c for a, b, c in table}
    assert len(completion) == len(table)  # distinct prefixes: each (a, b) determines c
    batch = task.sample(n, seed)
    check_common(task, batch, n)
    for tokens, labels, scored, judged, variable, var_mask in rows(batch):
        assert scored == [True] * 49 + [False]
        for p in range(49):
            assert labels[p] == tokens[p + 1]
        for p in range(1, 50):
            is_prefix = (tokens[p - 1], tokens[p]) in completion
            assert var_mask[p] and variable[p] == int(is_prefix)
            if judged[p]:  # a planted trigram's completion is what the label asks for
                assert is_prefix and p < 49 and tokens[p + 1] == completion[(tokens[p - 1], tokens[p])]
        assert not judged[0] and not judged[49]


def test_trigrams_are_planted_at_about_five_percent():
    batch = get_task("trigrams").sample(4000, 0)
    rate = batch.judged.float().sum() / (4000 * 48)
    assert 0.035 < rate < 0.05  # 5 % per free position; a trigram blocks the next two positions


def test_generators_are_seeded():
    for task in TASKS.values():
        a, b, c = task.sample(8, 1), task.sample(8, 1), task.sample(8, 2)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.tokens, c.tokens)


def test_encode_and_bad_input():
    task = get_task("cumsum")
    assert task.encode("3 -1 4 -1 5").tolist() == [8, 4, 9, 4, 10]
    with pytest.raises(SaelabError, match="not a token of cumsum"):
        task.encode("3 7")
    with pytest.raises(SaelabError, match="unknown zoo task 'sums'"):
        get_task("sums")
    with pytest.raises(SaelabError, match="positive"):
        task.sample(0, 0)
