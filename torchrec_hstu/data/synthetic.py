"""Deterministic synthetic interaction logs generated in code (no download).

Two generators:

* :func:`generate_ring_sequences` (retrieval): user sequences with structure that a sequence
  model can learn but a popularity model and a first-order item transition (Markov) model
  cannot. The recipe:

  - a long-tail catalogue: item popularity follows a Zipf law;
  - ``num_clusters`` user clusters, each with its own "ring", an ordered list of
    ``ring_len`` distinct items drawn by popularity (popular items sit on many rings, so the
    item alone does not say which ring a user walks);
  - a user walks the ring of their cluster. Each interaction follows a gap drawn as *quick*
    (minutes) or *slow* (hours to days). The ring step taken by the next item depends on
    the gap before the current item (quick: +1, slow: +2), so time gaps matter;
  - with probability ``noise`` an interaction is a popularity draw off the ring, after which
    the walk resumes from the last ring item: predicting the next item then needs to look
    past the last item.

  A first-order Markov model sees only the last item: it cannot tell the ring (cluster), the
  step (gap) or skip a noise item; HSTU sees the whole history and the timestamps.

* :func:`generate_impressions` (ranking): a log of impressions with click and long-view
  labels drawn from planted user preferences over item topics, for DLRM-HSTU-style ranking.
"""

import dataclasses

import numpy as np
import torch

from torchrec_hstu.data.sequences import SequenceDataset

MINUTE = 60
HOUR = 3600
DAY = 86400


@dataclasses.dataclass(frozen=True)
class RingSequenceConfig:
    """Size and dynamics of :func:`generate_ring_sequences`.

    Attributes:
        num_users: users ``U``.
        num_items: catalogue size ``N``.
        num_clusters: user clusters (one ring each).
        ring_len: items per ring.
        min_len: shortest sequence.
        max_len: longest sequence.
        noise: probability that an interaction is a popularity draw off the ring.
        quick_prob: probability that a gap is quick.
        zipf_exponent: popularity ``~ 1 / rank^zipf_exponent``.
        seed: RNG seed (the data is a pure function of this config).
    """

    num_users: int = 6000
    num_items: int = 3000
    num_clusters: int = 40
    ring_len: int = 120
    min_len: int = 20
    max_len: int = 50
    noise: float = 0.15
    quick_prob: float = 0.5
    zipf_exponent: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_clusters", "ring_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.ring_len > self.num_items:
            raise ValueError(f"ring_len must be <= num_items={self.num_items}; got {self.ring_len}")
        if not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"need 2 <= min_len <= max_len; got min_len={self.min_len}, max_len={self.max_len}")
        for name in ("noise", "quick_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0; got {self.zipf_exponent}")


def zipf_popularity(num_items: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """``[N]`` probabilities ``~ 1 / rank^exponent`` with ranks in a random item order."""
    ranks = rng.permutation(num_items)
    weights = 1.0 / np.power(ranks + 1.0, exponent)
    return weights / weights.sum()


def _sample_without_replacement(
    probs: np.ndarray, k: int, rows: int, rng: np.random.Generator
) -> np.ndarray:
    """``[rows, k]`` distinct draws per row, weighted by ``probs`` (Gumbel top-k)."""
    keys = np.log(probs)[None, :] + rng.gumbel(size=(rows, probs.size))
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]


@dataclasses.dataclass
class RingSequences:
    """Output of :func:`generate_ring_sequences`: the data and its hidden generative state.

    Attributes:
        dataset: the sequences.
        rings: ``[num_clusters, ring_len]`` item ids of every ring, in walk order.
        clusters: ``[U]`` cluster of each user.
        on_ring: ``[T]`` bool, False for noise interactions.
        popularity: ``[N]`` the Zipf law noise items were drawn from.
    """

    dataset: SequenceDataset
    rings: np.ndarray
    clusters: np.ndarray
    on_ring: np.ndarray
    popularity: np.ndarray


def generate_ring_sequences(config: RingSequenceConfig = RingSequenceConfig()) -> RingSequences:
    """Generate the built-in retrieval data set (deterministic in ``config``).

    Args:
        config: sizes, dynamics and seed.

    Returns:
        :class:`RingSequences` (``.dataset`` is the :class:`SequenceDataset`).

    Example::

        >>> out = generate_ring_sequences(RingSequenceConfig(num_users=10, num_items=50,
        ...     num_clusters=2, ring_len=20, min_len=3, max_len=5))
        >>> out.dataset.num_users
        10
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    popularity = zipf_popularity(cfg.num_items, cfg.zipf_exponent, rng)
    rings = _sample_without_replacement(popularity, cfg.ring_len, cfg.num_clusters, rng)
    rings = np.stack([rng.permutation(ring) for ring in rings])

    users = cfg.num_users
    clusters = rng.integers(0, cfg.num_clusters, size=users)
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=users)
    steps = cfg.max_len
    # Gap before every interaction; the first interaction counts as after a slow gap.
    quick = rng.random((users, steps)) < cfg.quick_prob
    quick[:, 0] = False
    quick_gaps = rng.integers(1 * MINUTE, 30 * MINUTE, size=(users, steps))
    slow_gaps = rng.integers(3 * HOUR, 2 * DAY, size=(users, steps))
    gaps = np.where(quick, quick_gaps, slow_gaps)
    gaps[:, 0] = rng.integers(0, 365 * DAY, size=users) + 1_600_000_000
    times = np.cumsum(gaps, axis=1)
    noise = rng.random((users, steps)) < cfg.noise
    noise[:, 0] = False
    noise_items = rng.choice(cfg.num_items, size=(users, steps), p=popularity)

    items = np.empty((users, steps), dtype=np.int64)
    position = rng.integers(0, cfg.ring_len, size=users)
    items[:, 0] = rings[clusters, position]
    for t in range(1, steps):
        # The step of the next ring item depends on the gap before the previous interaction.
        step = np.where(quick[:, t - 1], 1, 2)
        candidate = (position + step) % cfg.ring_len
        position = np.where(noise[:, t], position, candidate)
        items[:, t] = np.where(noise[:, t], noise_items[:, t], rings[clusters, position])

    keep = np.arange(steps)[None, :] < lengths[:, None]
    dataset = SequenceDataset(
        item_ids=torch.from_numpy(items[keep]),
        timestamps=torch.from_numpy(times[keep].astype(np.int64)),
        offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        num_items=cfg.num_items,
    )
    return RingSequences(dataset, rings, clusters, ~noise[keep], popularity)


@dataclasses.dataclass(frozen=True)
class ImpressionConfig:
    """Size and planted preferences of :func:`generate_impressions`.

    Attributes:
        num_users: users.
        num_items: catalogue size.
        num_topics: item topics; every user has a preference per topic.
        history_len: impressions per user before the candidates.
        num_candidates: candidate impressions per user (the ranking targets).
        zipf_exponent: item exposure popularity exponent.
        seed: RNG seed.
    """

    num_users: int = 6000
    num_items: int = 500
    num_topics: int = 10
    history_len: int = 30
    num_candidates: int = 10
    zipf_exponent: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_topics", "history_len", "num_candidates"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")


#: Action bits of the impression log (``actions`` is a bitmask of these).
CLICK = 1
LONG_VIEW = 2


@dataclasses.dataclass
class Impressions:
    """A synthetic impression log: per user, history impressions followed by candidates.

    Every user has ``H = history_len`` history and ``C = num_candidates`` candidate
    impressions, ``S = H + C`` in total, sorted by time.

    Attributes:
        item_ids: ``[U, S]`` int64.
        timestamps: ``[U, S]`` int64 seconds (the candidates share the request time).
        actions: ``[U, S]`` int64 bitmask (:data:`CLICK`, :data:`LONG_VIEW`).
        num_items: catalogue size.
        item_topics: ``[N]`` topic of each item.
        user_preferences: ``[U, num_topics]`` planted click log-odds per topic.
        history_len: ``H``.
        probabilities: ``[U, S, 2]`` the true P(click), P(long view) of every impression
            (an oracle ranker's scores).
    """

    item_ids: torch.Tensor
    timestamps: torch.Tensor
    actions: torch.Tensor
    num_items: int
    item_topics: torch.Tensor
    user_preferences: torch.Tensor
    history_len: int
    probabilities: torch.Tensor

    @property
    def num_users(self) -> int:
        return self.item_ids.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.item_ids.shape[1] - self.history_len


def generate_impressions(config: ImpressionConfig = ImpressionConfig()) -> Impressions:
    """Generate the built-in ranking data set (deterministic in ``config``).

    Each user has sparse topic preferences (a few liked topics with high log-odds, the rest
    negative); items have one topic and a quality. Exposure mixes the user's liked topics
    with popularity, so CTR by item alone is a weak signal while the history's clicks reveal
    the preferences. ``P(click) = sigmoid(pref[user, topic] + quality)``; a click becomes a long
    view with ``sigmoid(pref - 1 + 2 * quality)``. The hidden ``user_preferences`` make the
    oracle AUC computable.

    Args:
        config: sizes and seed.

    Returns:
        :class:`Impressions`.
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    topics = rng.integers(0, cfg.num_topics, size=cfg.num_items)
    quality = rng.normal(0.0, 0.5, size=cfg.num_items)
    popularity = zipf_popularity(cfg.num_items, cfg.zipf_exponent, rng)
    liked = rng.random((cfg.num_users, cfg.num_topics)) < 3.0 / cfg.num_topics
    prefs = np.where(liked, rng.normal(1.5, 0.5, liked.shape), rng.normal(-2.0, 0.5, liked.shape))

    steps = cfg.history_len + cfg.num_candidates
    # Exposure: half of the impressions come from the user's liked topics (if any), half
    # by popularity; a topic-conditional draw picks a random item of that topic.
    by_topic = [np.flatnonzero(topics == k) for k in range(cfg.num_topics)]
    popular = rng.choice(cfg.num_items, size=(cfg.num_users, steps), p=popularity)
    items = popular.copy()
    from_liked = rng.random((cfg.num_users, steps)) < 0.5
    for u in range(cfg.num_users):
        liked_topics = np.flatnonzero(liked[u])
        if liked_topics.size == 0:
            continue
        rows = np.flatnonzero(from_liked[u])
        chosen = rng.choice(liked_topics, size=rows.size)
        for r, k in zip(rows, chosen):
            if by_topic[k].size:
                items[u, r] = by_topic[k][rng.integers(by_topic[k].size)]
    logits = prefs[np.arange(cfg.num_users)[:, None], topics[items]] + quality[items]
    p_click = 1.0 / (1.0 + np.exp(-logits))
    click = rng.random(items.shape) < p_click
    long_logits = prefs[np.arange(cfg.num_users)[:, None], topics[items]] - 1.0 + 2.0 * quality[items]
    p_long_given_click = 1.0 / (1.0 + np.exp(-long_logits))
    long_view = click & (rng.random(items.shape) < p_long_given_click)
    actions = click.astype(np.int64) * CLICK + long_view.astype(np.int64) * LONG_VIEW
    gaps = rng.integers(10, 2 * HOUR, size=(cfg.num_users, steps))
    gaps[:, 0] = 1_600_000_000 + rng.integers(0, 365 * DAY, size=cfg.num_users)
    times = np.cumsum(gaps, axis=1)
    # The candidates are one ranking request: they share its timestamp.
    times[:, cfg.history_len :] = times[:, cfg.history_len : cfg.history_len + 1]
    return Impressions(
        item_ids=torch.from_numpy(items.astype(np.int64)),
        timestamps=torch.from_numpy(times.astype(np.int64)),
        actions=torch.from_numpy(actions),
        num_items=cfg.num_items,
        item_topics=torch.from_numpy(topics.astype(np.int64)),
        user_preferences=torch.from_numpy(prefs.astype(np.float32)),
        history_len=cfg.history_len,
        probabilities=torch.from_numpy(
            np.stack([p_click, p_click * p_long_given_click], axis=-1).astype(np.float32)
        ),
    )


def ring_membership(rings: np.ndarray, num_items: int) -> np.ndarray:
    """``[N]`` number of rings each item is on."""
    return np.bincount(rings.reshape(-1), minlength=num_items)
