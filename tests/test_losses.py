"""Unit tests of brainage.losses.

Every loss is checked against a slow per-pair loop in float64, written straight from the
formulas in docs/method.md §5 (plain Python floats, no torch), then for gradients, edge
cases, mixed precision, determinism and argument validation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from brainage.losses import (
    CONTRASTIVE_LOSSES,
    DEFAULT_AUGMENTATION,
    DISPLAY_NAMES,
    LOSS_NAMES,
    LOSS_PARAMETERS,
    NNCLRLoss,
    SupportSet,
    make_loss,
    nn_schedule,
)
from brainage.losses._common import masked_logsumexp, pairwise_distance
from brainage.losses.nnclr import cosine_nearest

KERNEL_LOSSES = ("simclr", "yaware", "threshold", "exponential", "adaptive")
DISTANCES = ("manhattan", "euclidean", "chebyshev", "cosine")
REDUCTIONS = ("anchor", "global")

# A small schedule so that NN_nb changes within a few epochs: batch_size 8, final 3,
# 10 epochs gives NN_nb = 7 at epoch 1, 5 at epoch 5 and 3 at epoch 10.
SMALL_SCHEDULE = {"batch_size": 8, "nn_final": 3, "max_epochs": 10, "nn_step": 1}


# --------------------------------------------------------------------------- inputs


def make_batch(batch: int, views: int = 2, dim: int = 5, seed: int = 0, dtype=torch.float64):
    """Random unit features [B, V, D] and bimodal ages [B] in years with exact
    duplicates (so Threshold's "strictly less" ties are exercised)."""
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, views, dim, generator=generator, dtype=dtype), dim=-1)
    young = 20.0 + torch.randint(0, 4, (batch,), generator=generator)
    old = 66.0 + torch.randint(0, 4, (batch,), generator=generator)
    is_old = torch.rand(batch, generator=generator) < 0.5
    ages = torch.where(is_old, old, young).to(dtype)
    ages[0] += 0.5  # one non-integer age
    return features, ages


def settings(**overrides):
    return {**SMALL_SCHEDULE, **overrides}


# --------------------------------------------------------------------------- reference loops


def view_major(features: torch.Tensor) -> list[list[float]]:
    batch, views, _ = features.shape
    return [features[b, v].tolist() for v in range(views) for b in range(batch)]


def dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def reference_distance(u, v, metric):
    if metric == "manhattan":
        return sum(abs(x - y) for x, y in zip(u, v))
    if metric == "euclidean":
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(u, v)))
    if metric == "chebyshev":
        return max(abs(x - y) for x, y in zip(u, v))
    return max(0.0, 1.0 - dot(u, v) / math.sqrt(dot(u, u) * dot(v, v)))


def reference_neighbourhood(z, anchor, size, metric):
    """The `size` rows nearest to `anchor`: itself first, then by (distance, index)."""
    def key(t):
        return (-1.0 if t == anchor else reference_distance(z[anchor], z[t], metric), t)

    return sorted(range(len(z)), key=key)[:size]


def reference_kernel_loss(
    name, features, ages, *, epoch=1, temperature=0.1, base_temperature=0.07, sigma=2.0,
    reduction="anchor", distance="manhattan", lam=None, batch_size=8, nn_final=3,
    max_epochs=10, nn_step=1,
):
    """docs/method.md §5, kernelised InfoNCE family, one pair at a time."""
    batch, views, _ = features.shape
    z = view_major(features)
    y = [float(ages[r % batch]) for r in range(views * batch)]
    n = len(z)
    raw = [[dot(z[a], z[b]) / temperature for b in range(n)] for a in range(n)]
    s = [[raw[a][b] - max(raw[a]) for b in range(n)] for a in range(n)]
    w = [[math.exp(-((y[a] - y[b]) ** 2) / (2 * sigma**2)) for b in range(n)] for a in range(n)]
    size = views * min(nn_schedule(epoch, max_epochs, batch_size, nn_final, nn_step), batch)

    def repulsion_terms(a, k):
        others = [t for t in range(n) if t != a]
        if name in ("simclr", "yaware"):
            return [math.exp(s[a][t]) for t in others]
        if name == "threshold":
            return [math.exp(s[a][t]) for t in others if w[a][t] < w[a][k]]
        if name == "exponential":
            return [math.exp(s[a][t] * (1 - w[a][t])) for t in others]
        neighbours = reference_neighbourhood(z, a, size, distance)
        if lam is None:
            return [math.exp(s[a][t] * (1 - w[a][t])) for t in neighbours if t != a]
        radius = reference_distance(z[a], z[neighbours[-1]], distance)
        terms = []
        for t in others:
            d = reference_distance(z[a], z[t], distance)
            nu = 1.0 if (t in neighbours or d <= radius) else (radius / d) ** lam
            if nu > 0:
                terms.append(nu * math.exp(s[a][t] * (1 - w[a][t])))
        return terms

    numerators, denominators = [], []
    for a in range(n):
        numerator = denominator = 0.0
        for k in range(n):
            if k == a:
                continue
            terms = repulsion_terms(a, k)
            if not terms:  # nothing to repel: the pair is left out of both sums
                continue
            weight = float(a % batch == k % batch) if name == "simclr" else w[a][k]
            numerator += weight * -(s[a][k] - math.log(sum(terms)))
            denominator += weight
        numerators.append(numerator)
        denominators.append(denominator)
    if reduction == "anchor":
        per_anchor = [u / v for u, v in zip(numerators, denominators) if v > 0]
        loss = sum(per_anchor) / len(per_anchor) if per_anchor else 0.0
    else:
        loss = sum(numerators) / sum(denominators) if sum(denominators) > 0 else 0.0
    return loss * temperature / base_temperature


def reference_rnc_loss(features, ages, temperature=2.0):
    batch, views, _ = features.shape
    z = view_major(features)
    y = [float(ages[r % batch]) for r in range(views * batch)]
    n = len(z)
    s = [[-reference_distance(z[a], z[b], "euclidean") / temperature for b in range(n)]
         for a in range(n)]
    total = 0.0
    for a in range(n):
        for k in range(n):
            if k == a:
                continue
            gap = abs(y[a] - y[k])
            repulsion = sum(math.exp(s[a][t]) for t in range(n) if t != a and abs(y[a] - y[t]) >= gap)
            total += -(s[a][k] - math.log(repulsion))
    return total / (n * (n - 1))


def reference_nnclr_loss(features, support, temperature=0.1):
    """½ [NT-Xent(NN(z1), z2) + NT-Xent(NN(z2), z1)], NN by cosine in `support`
    (first maximum wins), NT-Xent over the batch's other view."""
    first = features[:, 0].tolist()
    second = features[:, 1].tolist()
    support = support.tolist()

    def nearest(query):
        cosines = [dot(query, q) / math.sqrt(dot(query, query) * dot(q, q)) for q in support]
        return support[cosines.index(max(cosines))]

    def nt_xent(queries, keys):
        total = 0.0
        for i, query in enumerate(queries):
            logits = [dot(query, key) / temperature for key in keys]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        return total / len(queries)

    return 0.5 * (
        nt_xent([nearest(q) for q in first], second) + nt_xent([nearest(q) for q in second], first)
    )


def authors_threshold_loss(features, ages, *, temperature=0.1, base_temperature=0.07, sigma=2.0,
                           reduction="global"):
    """Threshold as the authors' code computes it (``DynLocRep_loss``, method ``threshold``,
    delta reduction ``sum``; docs/method.md §5.2), one scalar at a time:
    ``R_a = Σ_{t≠a} c_at exp(s_at)`` with ``c_at = #{k : w_tk < w_ta}`` over all rows k, and
    ``l_ak = log R_a − s_ak``. The arithmetic is on torch scalars, so autograd gives its
    gradient; the row maximum is a float (detached, as in the code). An anchor with
    ``R_a = 0`` (the code's log 0) is left out."""
    batch, views, _ = features.shape
    n = batch * views
    z = [features[r % batch, r // batch] for r in range(n)]  # view-major rows
    y = [float(ages[r % batch]) for r in range(n)]
    raw = [[torch.dot(z[a], z[b]) / temperature for b in range(n)] for a in range(n)]
    s = [[raw[a][b] - max(value.item() for value in raw[a]) for b in range(n)] for a in range(n)]
    w = [[math.exp(-((y[a] - y[b]) ** 2) / (2 * sigma**2)) for b in range(n)] for a in range(n)]
    count = [[sum(1 for k in range(n) if w[t][k] < w[t][a]) for t in range(n)] for a in range(n)]
    numerators, denominators = [], []
    for a in range(n):
        terms = [count[a][t] * torch.exp(s[a][t]) for t in range(n) if t != a and count[a][t] > 0]
        if not terms:
            continue
        log_repulsion = torch.log(sum(terms))
        numerators.append(sum(w[a][k] * (log_repulsion - s[a][k]) for k in range(n) if k != a))
        denominators.append(sum(w[a][k] for k in range(n) if k != a))
    if reduction == "anchor":
        per_anchor = [u / v for u, v in zip(numerators, denominators) if v > 0]
        loss = sum(per_anchor) / len(per_anchor)
    else:
        loss = sum(numerators) / sum(denominators)
    return loss * temperature / base_temperature


def assert_close(actual: torch.Tensor, expected: float, rel: float = 1e-6):
    assert actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=rel, abs=1e-12)


# --------------------------------------------------------------------------- against the loops


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["simclr", "yaware", "threshold", "exponential"])
def test_kernel_losses_match_loop(name, reduction):
    # distance and the schedule only matter for "adaptive" (tested below); they are
    # passed anyway, the way the trainer passes one shared dict.
    for batch, seed in ((6, 1), (8, 2)):
        features, ages = make_batch(batch, seed=seed)
        loss = make_loss(name, reduction=reduction, distance="cosine", **SMALL_SCHEDULE)
        expected = reference_kernel_loss(name, features, ages, reduction=reduction)
        assert_close(loss(features, ages, 1), expected)


@pytest.mark.parametrize("lam", [None, 1.0, 0.5])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_adaptive_matches_loop(reduction, distance, lam):
    features, ages = make_batch(8, seed=3)
    loss = make_loss("adaptive", reduction=reduction, distance=distance, lam=lam, **SMALL_SCHEDULE)
    for epoch in (1, 5, 10):  # NN_nb = 7, 5, 3
        expected = reference_kernel_loss(
            "adaptive", features, ages, epoch=epoch, reduction=reduction, distance=distance, lam=lam
        )
        assert_close(loss(features, ages, epoch), expected)


def test_adaptive_caps_neighbourhood_at_batch_and_then_equals_exponential():
    features, ages = make_batch(6, seed=4)  # 6 subjects < NN_nb = 7 at epoch 1
    adaptive = make_loss("adaptive", **SMALL_SCHEDULE)(features, ages, 1)
    assert_close(adaptive, reference_kernel_loss("adaptive", features, ages, epoch=1))
    assert_close(adaptive, make_loss("exponential")(features, ages, 1).item(), rel=1e-12)


def test_adaptive_tie_rule_matches_loop():
    # Identical views (no augmentation) and two identical subjects: many rows at
    # distance 0, so the neighbourhood boundary falls inside a tie.
    features, ages = make_batch(8, seed=5)
    features[:, 1] = features[:, 0]
    features[1] = features[0]
    for epoch in (1, 10):
        for lam in (None, 1.0):
            loss = make_loss("adaptive", distance="manhattan", lam=lam, **SMALL_SCHEDULE)
            expected = reference_kernel_loss("adaptive", features, ages, epoch=epoch, lam=lam)
            assert_close(loss(features, ages, epoch), expected)
    # NN_nb = 1 with a twin at distance 0: the anchor itself must still be in NN(a). With
    # λ, r_a = 0 and the twin's rows outside NN(a) lie at the boundary (0/0): ν = 1.
    schedule = {"batch_size": 8, "nn_final": 1, "max_epochs": 10, "nn_step": 1}
    for lam in (None, 1.0):
        loss = make_loss("adaptive", lam=lam, **schedule)
        expected = reference_kernel_loss("adaptive", features, ages, epoch=10, lam=lam, **schedule)
        assert_close(loss(features, ages, 10), expected)


@pytest.mark.parametrize("distance", ["manhattan", "chebyshev"])
def test_adaptive_tie_between_different_rows_picks_lowest_index(distance):
    # Rows 1, 2, 3 are exactly (binary fractions) at distance 1 from row 0 but have
    # different similarities to it, so which one enters NN(0) changes the loss.
    rows = {
        "manhattan": [[0.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.25, 0.25]],
        "chebyshev": [[0.0, 1.0], [1.0, 1.0], [1.0, 0.5], [1.0, 0.25]],
    }[distance]
    features = torch.tensor(rows, dtype=torch.float64)[:, None, :]  # V = 1
    ages = torch.tensor([30.0, 31.0, 33.0, 36.0], dtype=torch.float64)
    schedule = {"batch_size": 4, "nn_final": 2, "max_epochs": 10, "nn_step": 1}  # NN_nb = 2 at epoch 10
    loss = make_loss("adaptive", distance=distance, **schedule)
    expected = reference_kernel_loss("adaptive", features, ages, epoch=10, distance=distance, **schedule)
    assert_close(loss(features, ages, 10), expected)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_rnc_matches_loop(temperature):
    features, ages = make_batch(7, seed=6)
    features = features * 3.0  # RnC uses the features as given, not normalised
    loss = make_loss("rnc", rnc_temperature=temperature)
    assert_close(loss(features, ages, 1), reference_rnc_loss(features, ages, temperature))


def test_nnclr_matches_loop_and_fills_queue():
    loss = make_loss("nnclr", queue_size=10)
    first_batch, ages = make_batch(6, seed=7)
    # Empty queue: the support set is the batch's own view-1 embeddings.
    assert_close(loss(first_batch, ages, 1), reference_nnclr_loss(first_batch, first_batch[:, 0]))
    assert len(loss.support_set) == 6
    second_batch, _ = make_batch(6, seed=8)
    assert_close(loss(second_batch, ages, 1), reference_nnclr_loss(second_batch, first_batch[:, 0]))
    # 12 pushed into 10 slots: the two oldest are gone.
    expected_queue = torch.cat([first_batch[:, 0], second_batch[:, 0]])[2:]
    assert torch.equal(loss.support_set.contents(), expected_queue)
    third_batch, _ = make_batch(6, seed=9)
    assert_close(loss(third_batch, ages, 1), reference_nnclr_loss(third_batch, expected_queue))


def test_nnclr_neighbours_carry_no_gradient_with_an_empty_queue_either():
    """The first step of a run (an empty queue) takes its neighbours from the batch's own
    view-1 rows: without .detach() the loss value stays the same, but the gradient also ran
    through the neighbours (norm 1.94 -> 4.99 on a review's batch) and every NNCLR encoder
    took another path. It must equal the gradient with those rows already queued."""
    features, ages = make_batch(6, seed=7)
    empty = features.clone().requires_grad_()
    first_step = make_loss("nnclr", queue_size=10)
    value = first_step(empty, ages, 1)
    value.backward()
    queued = features.clone().requires_grad_()
    with_queue = make_loss("nnclr", queue_size=10)
    with_queue.support_set.push(queued[:, 0].detach())
    again = with_queue(queued, ages, 1)
    again.backward()
    torch.testing.assert_close(value, again)
    torch.testing.assert_close(empty.grad, queued.grad)


def test_nnclr_nearest_neighbour_swap_matches_loop():
    generator = torch.Generator().manual_seed(10)
    queries = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    support = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    swapped = cosine_nearest(queries, support)
    for query, neighbour in zip(queries, swapped):
        cosines = [F.cosine_similarity(query, row, dim=0).item() for row in support]
        assert torch.equal(neighbour, support[cosines.index(max(cosines))])


def test_support_set_is_fifo_and_saved_in_state_dict():
    queue = SupportSet(5)
    assert len(queue) == 0 and queue.contents().shape[0] == 0
    rows = torch.arange(24, dtype=torch.float32).reshape(12, 2)
    queue.push(rows[:3])
    assert torch.equal(queue.contents(), rows[:3])
    queue.push(rows[3:7])  # wraps around
    assert torch.equal(queue.contents(), rows[2:7])
    queue.push(rows[7:12])  # exactly one full turn
    assert torch.equal(queue.contents(), rows[7:12])
    queue.push(torch.cat([rows, rows]))  # more than fits: the newest five
    assert torch.equal(queue.contents(), rows[7:12])

    restored = SupportSet(5)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.contents(), queue.contents())
    restored.push(rows[:2])
    queue.push(rows[:2])
    assert torch.equal(restored.contents(), queue.contents())
    with pytest.raises(ValueError, match="3-d"):
        queue.push(torch.zeros(1, 3))


def test_nnclr_state_dict_and_eval_mode():
    loss = make_loss("nnclr", queue_size=8)
    features, ages = make_batch(4, seed=11)
    loss(features, ages, 1)
    buffers = {"support_set.embeddings", "support_set.next_slot", "support_set.n_filled"}
    assert buffers <= set(loss.state_dict())
    fresh = NNCLRLoss(queue_size=8)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.support_set.contents(), loss.support_set.contents())
    loss.eval()
    loss(features, ages, 1)
    assert len(loss.support_set) == 4  # no push outside training mode
    with pytest.raises(ValueError, match="2 views"):
        loss(features[:, :1], ages, 1)


# --------------------------------------------------------------------------- shared helpers


@pytest.mark.parametrize("metric", DISTANCES)
def test_pairwise_distance_is_non_negative_with_an_exact_zero_diagonal(metric):
    # Rows and their multiples: the cosine distance of parallel rows (and of a row with
    # itself) rounds to ±1e-16 before the clamp and the diagonal fill.
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distance = pairwise_distance(torch.cat([x, 3.0 * x]), metric)
    assert torch.count_nonzero(distance.diagonal()) == 0
    assert distance.min() >= 0.0


def test_masked_logsumexp_of_an_empty_row_is_finite_and_flagged():
    values = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [False, False]])
    log_sum, non_empty = masked_logsumexp(values, mask)
    assert log_sum[0, 0].item() == pytest.approx(math.log(4.0), rel=1e-12)
    assert torch.isfinite(log_sum).all()
    assert non_empty.tolist() == [[True], [False]]


# --------------------------------------------------------------------------- Algorithm 1


def test_nn_schedule_paper_sequence():
    sequence = [nn_schedule(epoch, 50, 32, 14, 1) for epoch in range(1, 51)]
    # Exact rational arithmetic: int(32 - 18/49 * epoch) = 32 - ceil(18 * epoch / 49).
    expected = [max(32 - math.ceil(Fraction(18 * epoch, 49)), 14) for epoch in range(1, 51)]
    assert sequence == expected
    assert sequence[:6] == [31, 31, 30, 30, 30, 29]
    assert sequence[-2:] == [14, 14]
    assert nn_schedule(200, 50, 32, 14, 1) == 14


def test_nn_schedule_with_steps():
    # step 10 of 50 epochs: 5 steps, decrement (32 - 4) / 4 = 7 per step.
    epochs = (1, 9, 10, 19, 20, 30, 40, 50)
    assert [nn_schedule(e, 50, 32, 4, 10) for e in epochs] == [32, 32, 25, 25, 18, 11, 4, 4]


def test_nn_schedule_demo_sequence_of_the_docs():
    # docs/method.md §5.4: the demo (B = 8, nn_final = 4, nn_step = 5, 75 epochs) gives 8 for
    # 4 epochs, then 7 for 15, 6 for 20, 5 for 15 and 4 for the last 21.
    sequence = [nn_schedule(epoch, 75, 8, 4, 5) for epoch in range(1, 76)]
    assert sequence == [8] * 4 + [7] * 15 + [6] * 20 + [5] * 15 + [4] * 21


def test_nn_final_equal_to_the_batch_size_is_allowed_and_constant():
    # docs/method.md §5.4 allows 1 <= nn_final <= B: nn_final = B is a valid (if degenerate)
    # schedule that never shrinks, so a ">=" in the range check must not refuse it.
    assert [nn_schedule(epoch, 10, 4, 4, 1) for epoch in range(1, 12)] == [4] * 11
    loss = make_loss("adaptive", batch_size=4, nn_final=4, max_epochs=10, nn_step=1)
    assert loss.neighbour_count(10, 4) == 4


def test_neighbour_count_is_capped_at_the_subjects_present():
    loss = make_loss("adaptive", **SMALL_SCHEDULE)  # NN_nb = 7 at epoch 1, 3 at epoch 10
    assert loss.neighbour_count(1, 8) == 7
    assert loss.neighbour_count(1, 5) == 5  # a smaller last batch
    assert loss.neighbour_count(10, 5) == 3


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"nn_final": 33}, "nn_final"),
        ({"nn_final": 0}, "nn_final"),
        ({"step_size": 50}, "step_size"),
        ({"step_size": 30}, "step_size"),  # a single step: Algorithm 1 would divide by 0
        ({"epoch": 0}, "epoch"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_nn_schedule_rejects_bad_arguments(kwargs, parameter):
    arguments = {"epoch": 1, "max_epochs": 50, "batch_size": 32, "nn_final": 14, "step_size": 1}
    arguments |= kwargs
    with pytest.raises(ValueError, match=parameter):
        nn_schedule(**arguments)


# --------------------------------------------------------------------------- appendix A.1


def test_lambda_zero_equals_exponential():
    features, ages = make_batch(8, seed=12)
    for reduction in REDUCTIONS:
        weighted_loss = make_loss("adaptive", lam=0.0, reduction=reduction, **SMALL_SCHEDULE)
        weighted = weighted_loss(features, ages, 10)
        exponential = make_loss("exponential", reduction=reduction)(features, ages, 10)
        assert weighted.item() == pytest.approx(exponential.item(), rel=1e-12)


def test_lambda_zero_equals_exponential_when_the_radius_is_zero():
    # Identical views and NN_nb = 1: NN(a) is the anchor and its other view, at distance 0,
    # so r_a = 0 and every other row has ν = (0 / d_at)^0, which is 1 (λ = 0 is Exponential),
    # not 0 · log 0 = NaN.
    features, ages = make_batch(6, seed=31)
    features[:, 1] = features[:, 0]
    schedule = {"batch_size": 6, "nn_final": 1, "max_epochs": 10, "nn_step": 1}
    weighted = make_loss("adaptive", lam=0.0, **schedule)(features, ages, 10)
    exponential = make_loss("exponential")(features, ages, 10)
    assert weighted.item() == pytest.approx(exponential.item(), rel=1e-12)


def test_large_lambda_approaches_adaptive():
    features, ages = make_batch(8, seed=13)
    hard = make_loss("adaptive", **SMALL_SCHEDULE)(features, ages, 10).item()
    values = [
        make_loss("adaptive", lam=lam, **SMALL_SCHEDULE)(features, ages, 10).item()
        for lam in (1, 10, 100, 1e4)
    ]
    assert all(a > b for a, b in zip(values, values[1:]))  # R shrinks as λ grows
    assert values[-1] == pytest.approx(hard, rel=1e-4)
    assert values[-1] > hard


# --------------------------------------------------------------------------- gradients


GRAD_CASES = [(name, None) for name in CONTRASTIVE_LOSSES] + [("adaptive", 1.0)]


@pytest.mark.parametrize(("name", "lam"), GRAD_CASES)
def test_gradcheck(name, lam):
    generator = torch.Generator().manual_seed(14)
    raw = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    ages = torch.tensor([20.0, 21.0, 60.0, 62.0], dtype=torch.float64)
    params = {"lam": lam, "batch_size": 4, "nn_final": 2, "max_epochs": 10, "nn_step": 1}
    loss = make_loss(name, **params)
    if name == "nnclr":
        loss.support_set.push(torch.randn(6, 3, generator=generator, dtype=torch.float64))
        loss.eval()  # a fixed support set during the check
    if name == "rnc":
        function = lambda x: loss(x, ages, 5)  # noqa: E731 - RnC takes features as given
    else:
        function = lambda x: loss(F.normalize(x, dim=-1), ages, 5)  # noqa: E731
    assert torch.autograd.gradcheck(function, (raw,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- edge cases


def unit(features):
    return F.normalize(features, dim=-1)


EDGE_CASES = {
    "all ages equal": lambda: (make_batch(6, seed=15)[0], torch.full((6,), 40.0, dtype=torch.float64)),
    "one subject": lambda: (make_batch(1, seed=16)[0], torch.tensor([40.0], dtype=torch.float64)),
    "one row": lambda: (make_batch(1, views=1, seed=17)[0], torch.tensor([40.0], dtype=torch.float64)),
    "identical embeddings": lambda: (
        unit(torch.ones(6, 2, 5, dtype=torch.float64)), make_batch(6, seed=18)[1]
    ),
    "batch smaller than NN_nb": lambda: make_batch(3, seed=19),
    "one view, far ages": lambda: (  # float32 kernel weights underflow to 0
        make_batch(4, views=1, seed=20)[0], torch.tensor([1.0, 30.0, 60.0, 90.0], dtype=torch.float64)
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", CONTRASTIVE_LOSSES)
def test_edge_cases_are_finite(name, case, dtype):
    features, ages = EDGE_CASES[case]()
    if name == "nnclr" and features.shape[1] != 2:
        pytest.skip("NNCLR needs two views")
    features = features.to(dtype).requires_grad_()
    for lam in (None, 1.0) if name == "adaptive" else (None,):
        loss = make_loss(name, lam=lam, batch_size=32, nn_final=14, max_epochs=50, nn_step=1)
        value = loss(features, ages.to(dtype), 1)
        assert value.dim() == 0 and torch.isfinite(value)
        assert value.grad_fn is not None
        (gradient,) = torch.autograd.grad(value, features)
        assert torch.isfinite(gradient).all()


def test_anchor_mean_leaves_out_anchors_without_a_usable_pair():
    # Threshold, V = 1, ages 0, 10, 10 (docs/method.md §5.1-5.2). Anchor 0 sees both others
    # at the same w, so neither pair has a strictly less age-similar row to repel: both are
    # dropped and anchor 0 has no weight. It must not count in the anchor mean (a plain mean
    # over all N anchors would divide by 3). Anchors 1 and 2 keep one pair each, with weight
    # w = 1 and the third subject as the only repelled row, so (the shift cancels)
    # l_12 = s_10 - s_12 = (cos_10 - cos_12)/τ = (0 - 0.8)/0.1 = -8 and
    # l_21 = (cos_20 - cos_21)/τ = (0.6 - 0.8)/0.1 = -2; both reductions give
    # (-8 - 2)/2 · τ/τ_b = -5 · 0.1/0.07.
    features = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]], dtype=torch.float64)
    ages = torch.tensor([0.0, 10.0, 10.0], dtype=torch.float64)
    for reduction in REDUCTIONS:
        value = make_loss("threshold", reduction=reduction)(features, ages, 1)
        assert_close(value, -5.0 * 0.1 / 0.07, rel=1e-9)


def test_threshold_with_nothing_to_repel_is_a_connected_zero():
    features, _ = make_batch(5, seed=21)
    features.requires_grad_()
    ages = torch.full((5,), 33.0, dtype=torch.float64)  # every w_at = 1: no t with w_at < w_ak
    for reduction in REDUCTIONS:
        value = make_loss("threshold", reduction=reduction)(features, ages, 1)
        assert value.item() == 0.0 and value.grad_fn is not None
        (gradient,) = torch.autograd.grad(value, features)
        assert torch.count_nonzero(gradient) == 0


def test_adaptive_with_only_itself_as_neighbour_is_a_connected_zero():
    features, ages = make_batch(4, views=1, seed=22)
    features.requires_grad_()
    loss = make_loss("adaptive", batch_size=4, nn_final=1, max_epochs=10, nn_step=1)
    value = loss(features, ages, 10)  # V · NN_nb = 1: NN(a) = {a}, nothing to repel
    assert value.item() == 0.0 and value.grad_fn is not None


# --------------------------------------------------------------------------- Threshold: the authors' form


THRESHOLD_REFERENCE_BATCHES = [(6, 2, 1), (8, 2, 2), (5, 3, 25), (7, 1, 26)]  # (B, V, seed)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("batch", "views", "seed"), THRESHOLD_REFERENCE_BATCHES)
def test_threshold_reference_form_matches_authors_formula(batch, views, seed, reduction):
    features, ages = make_batch(batch, views=views, seed=seed)  # duplicate ages: ties
    features.requires_grad_()
    loss = make_loss("threshold", threshold_form="reference", reduction=reduction)
    value = loss(features, ages, 1)
    expected = authors_threshold_loss(features, ages, reduction=reduction)
    assert_close(value, expected.item(), rel=1e-10)
    (gradient,) = torch.autograd.grad(value, features)
    (expected_gradient,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(gradient) > 0


def test_threshold_reference_form_in_float32_matches_float64():
    # Ages within 15 years: no float32 kernel weight underflows to 0 (that would add ties).
    features, _ = make_batch(8, seed=27)
    ages = torch.tensor([20.0, 22.0, 22.0, 25.5, 27.0, 30.0, 31.0, 35.0], dtype=torch.float64)
    loss = make_loss("threshold", threshold_form="reference", reduction="global")
    single = loss(features.float(), ages.float(), 1)
    assert single.dtype == torch.float32
    assert single.item() == pytest.approx(authors_threshold_loss(features, ages).item(), rel=1e-5)


def test_threshold_forms_differ():
    features, ages = make_batch(8, seed=2)
    features.requires_grad_()
    for reduction in REDUCTIONS:
        paper = make_loss("threshold", reduction=reduction)(features, ages, 1)
        reference = make_loss("threshold", threshold_form="reference", reduction=reduction)(features, ages, 1)
        assert_close(paper, reference_kernel_loss("threshold", features.detach(), ages, reduction=reduction))
        assert abs(paper.item() - reference.item()) > 0.1
        (paper_gradient,) = torch.autograd.grad(paper, features)
        (reference_gradient,) = torch.autograd.grad(reference, features)
        assert not torch.allclose(paper_gradient, reference_gradient, rtol=1e-3, atol=1e-6)


def test_threshold_reference_form_with_subject_separating_kernel_is_constant():
    # σ = 0.01 years and whole-year gaps: w = 1 within a subject, exactly 0 across subjects.
    # Then c_at = N − 2 for the anchor's other view and 0 for every other row: the reference
    # form repels only the positive itself, l_aa' = log(N − 2), with no gradient; the paper
    # form repels the other subjects.
    features, _ = make_batch(5, seed=28)
    features.requires_grad_()
    ages = torch.tensor([20.0, 31.0, 45.0, 52.0, 70.0], dtype=torch.float64)
    for reduction in REDUCTIONS:
        reference = make_loss("threshold", sigma=0.01, threshold_form="reference", reduction=reduction)
        value = reference(features, ages, 1)
        assert_close(value, math.log(10 - 2) * 0.1 / 0.07, rel=1e-12)
        (gradient,) = torch.autograd.grad(value, features)
        torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-12)
        paper = make_loss("threshold", sigma=0.01, reduction=reduction)(features, ages, 1)
        (paper_gradient,) = torch.autograd.grad(paper, features)
        assert paper_gradient.abs().max() > 1e-3


THRESHOLD_EMPTY_CASES = {
    # B = 2, V = 1: the pair (a, t) has no row less similar than t (paper form), and in row t
    # no entry is below w_ta (reference form): both forms leave every pair out.
    "two rows": lambda: (make_batch(2, views=1, seed=29)[0], torch.tensor([30.0, 34.0], dtype=torch.float64)),
    "all ages equal": lambda: (make_batch(5, seed=21)[0], torch.full((5,), 33.0, dtype=torch.float64)),
    "one subject": lambda: (make_batch(1, views=3, seed=16)[0], torch.tensor([40.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(THRESHOLD_EMPTY_CASES))
def test_threshold_forms_coincide_where_both_leave_every_pair_out(case):
    """The only case where the two forms agree for every input (docs/method.md §5.2)."""
    features, ages = THRESHOLD_EMPTY_CASES[case]()
    features.requires_grad_()
    for reduction in REDUCTIONS:
        for form in ("paper", "reference"):
            value = make_loss("threshold", threshold_form=form, reduction=reduction)(features, ages, 1)
            assert value.item() == 0.0 and value.grad_fn is not None
            (gradient,) = torch.autograd.grad(value, features)
            assert torch.count_nonzero(gradient) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_threshold_reference_form_edge_cases_are_finite(case, dtype):
    features, ages = EDGE_CASES[case]()
    features = features.to(dtype).requires_grad_()
    value = make_loss("threshold", threshold_form="reference")(features, ages.to(dtype), 1)
    assert value.dim() == 0 and torch.isfinite(value) and value.grad_fn is not None
    (gradient,) = torch.autograd.grad(value, features)
    assert torch.isfinite(gradient).all()


def test_threshold_reference_form_runs_in_float32_under_bf16_autocast():
    features, ages = make_batch(8, seed=30, dtype=torch.float32)
    loss = make_loss("threshold", threshold_form="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(features.to(torch.bfloat16), ages, 1)
    upcast = loss(features.to(torch.bfloat16).float(), ages, 1)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(upcast.item(), rel=1e-6)


def test_threshold_reference_form_gradcheck():
    generator = torch.Generator().manual_seed(14)
    raw = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    ages = torch.tensor([20.0, 21.0, 60.0, 62.0], dtype=torch.float64)
    loss = make_loss("threshold", threshold_form="reference")
    function = lambda x: loss(F.normalize(x, dim=-1), ages, 5)  # noqa: E731
    assert torch.autograd.gradcheck(function, (raw,), eps=1e-6, atol=1e-6)


def test_threshold_form_default_and_repr():
    assert make_loss("threshold").threshold_form == "paper"
    assert "threshold_form='reference'" in repr(make_loss("threshold", threshold_form="reference"))


# --------------------------------------------------------------------------- precision, determinism


@pytest.mark.parametrize("name", CONTRASTIVE_LOSSES)
def test_bf16_autocast_is_finite_and_close_to_float32(name):
    generator = torch.Generator().manual_seed(23)
    inputs = torch.randn(8, 2, 16, generator=generator)
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16, generator=generator) / 4)
        layer.bias.zero_()
    ages = make_batch(8, seed=23)[1].float()
    with torch.no_grad():
        reference = make_loss(name, **SMALL_SCHEDULE)(unit(layer(inputs)), ages, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = unit(layer(inputs)).to(torch.bfloat16)
            mixed = make_loss(name, **SMALL_SCHEDULE)(features, ages, 5)
        # The loss itself runs in float32 whatever the context: same as calling it on
        # the upcast bf16 features outside autocast.
        upcast = make_loss(name, **SMALL_SCHEDULE)(features.float(), ages, 5)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(upcast.item(), rel=1e-6)
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-2)


# Rank-N-Contrast computes no matrix product (its distances are cdist's, pair by pair)
@pytest.mark.parametrize("name", [name for name in CONTRASTIVE_LOSSES if name != "rnc"])
def test_a_loss_computes_its_products_without_tf32_whatever_training_allows(name):
    """train.precision auto lets CUDA round float32 matrix products to TF32 (10 mantissa
    bits) for the training step's layers; inside a loss that changed which rows were
    nearest (found by a review). Every product a loss computes sees TF32 off, and the
    caller's setting is restored after."""
    from torch.overrides import TorchFunctionMode

    products = {torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul,
                torch.Tensor.mm}
    seen = []

    class RecordTf32(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in products:
                seen.append(torch.backends.cuda.matmul.allow_tf32)
            return func(*args, **(kwargs or {}))

    features, ages = make_batch(8, seed=25, dtype=torch.float32)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # what runtime_setup sets for auto
        with RecordTf32():
            make_loss(name, **SMALL_SCHEDULE)(features, ages, 3)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen and not any(seen), seen


def test_cosine_distances_of_near_duplicates_stay_distinct_in_float32():
    """1 - u_a·u_b cancels: four unit vectors 3e-5 to 2e-4 away from a fifth all came out
    at distance 0 in float32 (found by a review), so the cosine neighbourhood's order among
    them was arbitrary. The distances keep float64's order and size."""
    generator = torch.Generator().manual_seed(26)
    centre = F.normalize(torch.randn(16, generator=generator, dtype=torch.float64), dim=0)
    nudges = F.normalize(torch.randn(4, 16, generator=generator, dtype=torch.float64), dim=1)
    rows = F.normalize(torch.cat([centre[None], centre + nudges * torch.tensor(
        [3e-5, 6e-5, 1e-4, 2e-4], dtype=torch.float64)[:, None]]), dim=1)
    exact = (1.0 - rows @ rows.T)[0, 1:]  # float64: no cancellation at these sizes
    single = pairwise_distance(rows.float(), "cosine")[0, 1:].double()
    assert (single > 0).all() and torch.equal(single.argsort(), exact.argsort())
    assert torch.allclose(single, exact, rtol=1e-2, atol=0)
    assert torch.allclose(pairwise_distance(rows, "cosine")[0, 1:], exact, rtol=1e-5)


@pytest.mark.parametrize("name", CONTRASTIVE_LOSSES)
def test_deterministic(name):
    features, ages = make_batch(8, seed=24, dtype=torch.float32)
    first = make_loss(name, **SMALL_SCHEDULE)(features, ages, 3)
    second = make_loss(name, **SMALL_SCHEDULE)(features, ages, 3)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- registry, validation


def test_a_loss_of_other_age_weights_reads_the_rows_ages_in_both_hooks():
    """docs/architecture.md §9: a loss that only changes the weights or the repulsion set
    subclasses KernelContrastiveLoss. An age weighting other than the RBF kernel (age bins)
    needs the rows' ages, which neither hook received."""
    from brainage.losses.kernel import KernelContrastiveLoss, YAwareLoss

    seen = {}

    class AgeBinLoss(YAwareLoss):
        def _positive_weights(self, kernel, row_subjects, row_ages):
            seen["weights"] = row_ages
            bins = torch.div(row_ages, 10, rounding_mode="floor")
            return (bins[:, None] == bins[None, :]).to(kernel.dtype)

        def _log_repulsion(self, *, row_ages, **rest):
            seen["repulsion"] = row_ages
            return super()._log_repulsion(**rest)

    assert issubclass(AgeBinLoss, KernelContrastiveLoss)
    features = F.normalize(torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)),
                           dim=-1)
    ages = torch.tensor([21.0, 25.0, 48.0, 70.0])
    loss = AgeBinLoss(sigma=2.0)(features, ages, 1)
    assert torch.isfinite(loss)
    expected = ages.repeat(2)  # view-major: the batch's ages once per view
    assert torch.equal(seen["weights"], expected) and torch.equal(seen["repulsion"], expected)
    assert loss != YAwareLoss(sigma=2.0)(features, ages, 1)  # the bins, not the kernel


def test_registry_names_and_metadata():
    assert CONTRASTIVE_LOSSES == ("simclr", "nnclr", "rnc", "yaware", "threshold", "exponential",
                                  "adaptive")
    assert LOSS_NAMES == (*CONTRASTIVE_LOSSES, "supervised")
    assert DISPLAY_NAMES["adaptive"] == "Adaptive Neighborhoods"
    assert DISPLAY_NAMES["rnc"] == "Rank-N-Contrast"
    assert set(DISPLAY_NAMES) == set(DEFAULT_AUGMENTATION) == set(LOSS_NAMES)
    noisy = {name for name, augmentation in DEFAULT_AUGMENTATION.items() if augmentation == "noise"}
    assert noisy == {"simclr", "nnclr"}
    for name in LOSS_NAMES:
        loss = make_loss(name)
        assert isinstance(loss, torch.nn.Module)
        assert loss.default_augmentation == DEFAULT_AUGMENTATION[name]


def test_the_gpu_checks_train_every_loss():
    """tests/test_cuda.py's losses are listed by hand: a loss missing there was never
    trained in bf16 on a GPU, and nothing failed (found by a review)."""
    from test_cuda import LOSS_SETTINGS

    assert list(LOSS_SETTINGS) == list(LOSS_NAMES)


def test_one_shared_settings_dict_works_for_every_loss():
    shared = {
        "temperature": 0.1, "base_temperature": 0.07, "sigma": 2.0, "reduction": "global",
        "distance": "cosine", "nn_final": 14, "nn_step": 1, "max_epochs": 50, "batch_size": 32,
        "lam": None, "threshold_form": "reference", "rnc_temperature": 2.0, "queue_size": 256,
        "age_mean": 45.0, "age_sd": 15.0,
    }
    assert set(shared) == LOSS_PARAMETERS
    for name in LOSS_NAMES:
        make_loss(name, **shared)
    assert make_loss("adaptive", **shared).distance == "cosine"
    assert make_loss("threshold", **shared).threshold_form == "reference"


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        make_loss("supcon")
    for name in LOSS_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "params", "parameter"),
    [
        ("yaware", {"temperature": -0.1}, "temperature"),
        ("simclr", {"temperature": 0.0}, "temperature"),
        ("nnclr", {"temperature": -1.0}, "temperature"),
        ("exponential", {"base_temperature": 0.0}, "base_temperature"),
        ("threshold", {"sigma": -2.0}, "sigma"),
        ("yaware", {"reduction": "mean"}, "reduction"),
        ("threshold", {"threshold_form": "code"}, "threshold_form"),
        ("adaptive", {"distance": "hamming"}, "distance"),
        ("adaptive", {"nn_final": 40, "batch_size": 32}, "nn_final"),
        ("adaptive", {"nn_step": 50, "max_epochs": 50}, "nn_step"),
        ("adaptive", {"nn_step": 0}, "nn_step"),
        ("adaptive", {"lam": -1.0}, "lam"),
        ("adaptive", {"lam": math.inf}, "lam"),
        ("adaptive", {"lam": True}, "lam"),
        ("yaware", {"temperature": math.inf}, "temperature"),
        ("threshold", {"sigma": math.nan}, "sigma"),
        ("adaptive", {"nn_step": True}, "nn_step"),
        ("supervised", {"age_sd": 0.0}, "age_sd"),
        ("adaptive", {"batch_size": 0}, "batch_size"),
        ("rnc", {"rnc_temperature": 0.0}, "rnc_temperature"),
        ("nnclr", {"queue_size": 0}, "queue_size"),
        ("adaptive", {"temprature": 0.1}, "temprature"),
        ("simclr", {"nn_finale": 3}, "nn_finale"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(name, params, parameter):
    with pytest.raises(ValueError, match=parameter):
        make_loss(name, **params)


def test_bad_inputs_raise():
    loss = make_loss("yaware")
    features, ages = make_batch(4)
    with pytest.raises(ValueError, match="features"):
        loss(features[0], ages, 1)
    with pytest.raises(ValueError, match="features"):
        loss(features[None], ages, 1)
    with pytest.raises(ValueError, match="floating point"):
        loss(torch.ones(4, 2, 5, dtype=torch.int64), ages, 1)
    with pytest.raises(ValueError, match="ages"):
        loss(features, ages[:3], 1)
    with pytest.raises(ValueError, match="epoch"):
        make_loss("adaptive")(features, ages, 0)


def test_supervised_loss_is_the_l1_error_in_years():
    loss = make_loss("supervised", age_mean=40.0, age_sd=10.0)
    standardised = torch.tensor([[[0.0], [0.5]], [[1.0], [1.0]]])  # [B=2, V=2, 1]
    ages = torch.tensor([40.0, 45.0])
    # predicted 40, 45 | 50, 50 -> errors 0, 5 | 5, 5
    assert loss(standardised, ages, 1).item() == pytest.approx(3.75)
    # ages as a column [B, 1] (accepted by the shape check, as by the other losses) must not
    # broadcast into a comparison of every subject with every age (that gives 5.0 here)
    assert loss(standardised, ages[:, None], 1).item() == pytest.approx(3.75)
    with pytest.raises(ValueError, match="model.head: regression"):
        loss(torch.zeros(2, 2, 4), ages, 1)


def test_supervised_loss_compares_each_view_with_its_own_subject():
    # B = 3 subjects, V = 2 views (B != V, so ages cannot line up with the views instead):
    # predicted 30, 30 | 40, 50 | 60, 60 against 30 | 40 | 70 -> errors 0, 0 | 0, 10 | 10, 10.
    loss = make_loss("supervised", age_mean=40.0, age_sd=10.0)
    standardised = torch.tensor([[[-1.0], [-1.0]], [[0.0], [1.0]], [[2.0], [2.0]]])
    ages = torch.tensor([30.0, 40.0, 70.0])
    assert loss(standardised, ages, 1).item() == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["supervised", "yaware", "nnclr", "rnc", "adaptive"])
@pytest.mark.parametrize("shape", [(0, 2, 4), (3, 0, 4), (3, 2, 0)])
def test_an_empty_batch_is_refused_alike_by_every_loss(name, shape):
    """An empty batch (no subject, view or feature) gave an IndexError in the kernel losses
    and NNCLR, 0 in RnC and NaN in the supervised loss."""
    features, ages = torch.zeros(shape), torch.zeros(shape[0])
    with pytest.raises(ValueError, match=r"at least one subject, one view and one feature"):
        make_loss(name)(features, ages, 1)
