"""Ranking benchmark: how much of a night's output a reviewer must look at, and how much GPU
time a keeper costs, with a planted signal.

The planted signal: every candidate is a random texture, and a keeper is one whose texture is
tinted faintly warm (red raised and blue lowered by 6% of the range). The tint is a property
of the pixels only, so the tiny random CLIP scorer (the same loading and scoring path as a
real scorer) sees it in its embedding. About 15% of candidates are keepers, and how many an
item holds varies. Simulated reviewers decide in the app's order (review.ranking.order over
the rows in the database), through the review queue's own claim/decide/submit, and keep a
keeper, or reject a reject, 90% of the time (10% label noise).

After 200, 1,000 and 5,000 decisions a keeper model is trained (review.ranking.train) and a
fresh evaluation run of unseen items is ranked by it. Printed for each:

- the model's held-out AUC (on held-out items of the decided runs) and its AUC on the
  evaluation run against the planted truth;
- the fraction of the evaluation run's candidates a reviewer sees when each item's grid is
  read best first down to the run's one cut line (review.ranking.order.cut_for), and the
  share of the planted keepers found there (goal: 95% of them in <= 25% of the candidates);
- reviewer-seconds per keeper at one second a look (goal: under 2).

Then GPU-seconds per keeper with the adaptive budget (producer.budget) against a fixed one,
on a catalogue whose three templates keep 5%, 10% and 25% (fivefold apart), with the same
number of images rendered (goal: >= 30% fewer GPU-seconds per keeper).

    .venv/bin/python benchmarks/ranking.py [--database-url URL] [--evaluation-items 150]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Before transformers is imported: its notices and bars are not the benchmark's figures.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from db.keep_rates import ArmRecord
from db.migrate import upgrade
from db.models import CatalogueItem, Decision, Image, ImageReview, Job, JobStatus, Run
from db.ranking import ImageScore
from db.session import make_engine, make_sessionmaker
from producer.budget import allocate
from review.accounts import add_reviewer
from review.queue import claim_next, decide, submit, sync_queue
from review.ranking.order import cut_for, item_scores, rank_and_group
from review.ranking.predict import predict_source
from review.ranking.train import train_keeper_model
from worker.scoring.scorer import Scorer, load_scorer
from worker.scoring.tiny import HEAD_FILE, build_tiny_scorer

SOURCE = "catalogue.csv"
TEMPLATES = ("studio", "lifestyle", "flatlay")
CANDIDATES = 16  # per item: one job of 16 seeds
KEEPER_SHARE = 0.15
LABEL_NOISE = 0.10
CHECKPOINTS = (200, 1000, 5000)
LEASE = timedelta(minutes=10)
DUPLICATE_THRESHOLD = 0.999  # planted textures are all distinct: no grouping here
# How far a keeper's red is raised and its blue lowered (of 1.0): faint enough that a single
# pixel does not show it, so the model must read it from the whole image's embedding.
TINT = 0.06
BUDGET_RATES = {"studio": 0.05, "lifestyle": 0.10, "flatlay": 0.25}


@dataclass
class Planted:
    run_id: int
    truth: dict[int, bool]  # image id -> planted keeper


def planted_pixels(rng: np.random.Generator, keepers: np.ndarray) -> torch.Tensor:
    """A batch of random textures; the keepers' tinted warm."""
    pixels = rng.random((len(keepers), 3, 64, 64), dtype=np.float32)
    pixels[keepers, 0] = np.minimum(pixels[keepers, 0] + TINT, 1.0)
    pixels[keepers, 2] = np.maximum(pixels[keepers, 2] - TINT, 0.0)
    return torch.from_numpy(pixels)


def plant_run(
    session: Session, scorer: Scorer, name: str, items: int, rng: np.random.Generator
) -> Planted:
    """A finished run of ``items`` items with scored candidates, queued for review."""
    run = Run(name=name, source=SOURCE, status="finished")
    session.add(run)
    session.flush()
    truth: dict[int, bool] = {}
    for index in range(items):
        item = CatalogueItem(
            source=SOURCE, external_key=f"{name}-{index}", fields={}, content_hash=f"{name}{index}"
        )
        session.add(item)
        session.flush()
        truth.update(_plant_job(session, scorer, run, item, index, rng))
    session.commit()
    sync_queue(session, run.id)
    return Planted(run.id, truth)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plant_job(
    session: Session,
    scorer: Scorer,
    run: Run,
    item: CatalogueItem,
    index: int,
    rng: np.random.Generator,
) -> dict[int, bool]:
    template = TEMPLATES[index % len(TEMPLATES)]
    prompt = f"a product photo, {template}"
    job = Job(
        run_id=run.id, item_id=item.id, template=template, prompt=prompt, model="tiny",
        steps=1, guidance=1.0, width=64, height=64, seeds=list(range(CANDIDATES)),
        status=JobStatus.DONE, dedupe_key=_key(f"{run.name}-{index}"),
    )  # fmt: skip
    session.add(job)
    session.flush()
    # Items differ in how many keepers they hold: the item's own rate varies around the share.
    rate = float(np.clip(rng.beta(1.5, 1.5 / KEEPER_SHARE - 1.5), 0.0, 0.9))
    keepers = rng.random(CANDIDATES) < rate
    scores = scorer.score(planted_pixels(rng, keepers), prompt)
    truth = {}
    for seed, (keeper, score) in enumerate(zip(keepers, scores, strict=True)):
        image = Image(
            job_id=job.id, seed=seed, storage_key=f"{job.id}/{seed}.png", sha256=f"{job.id}-{seed}",
            width=64, height=64, bytes=1, safety="safe", render_seconds=0.25,
        )  # fmt: skip
        session.add(image)
        session.flush()
        session.add(
            ImageScore(
                image_id=image.id, scorer=scorer.identity, clip_score=score.clip_score,
                aesthetic_score=score.aesthetic_score, image_similarity=None,
                embedding=score.embedding,
            )
        )  # fmt: skip
        truth[image.id] = bool(keeper)
    return truth


def review_until(
    sessions: sessionmaker[Session],
    run: Planted,
    reviewer_id: int,
    target: int,
    rng: np.random.Generator,
) -> int:
    """Reviewers decide every candidate of item after item, in the app's order, until the
    source has ``target`` decisions; returns the count reached."""
    with sessions() as session:
        while (done := _decisions(session)) < target:
            item_id = claim_next(session, run_id=run.run_id, reviewer_id=reviewer_id, lease=LEASE)
            if item_id is None:
                return done
            for image_id in _app_order(session, item_id):
                keep = run.truth[image_id] != (rng.random() < LABEL_NOISE)
                decision = Decision.KEEP if keep else Decision.REJECT
                decide(session, item_id, image_id, decision, reviewer_id=reviewer_id, lease=LEASE)
            submit(session, item_id, reviewer_id=reviewer_id, lease=LEASE)
        return done


def _decisions(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ImageReview)) or 0)


def _app_order(session: Session, review_item_id: int) -> list[int]:
    from db.models import ReviewItem

    item = session.get(ReviewItem, review_item_id)
    assert item is not None
    scored = item_scores(session, item.run_id, item.item_id)
    groups = rank_and_group(list(scored.values()), threshold=DUPLICATE_THRESHOLD)
    return [member.image_id for group in groups for member in group.members]


@dataclass
class Evaluation:
    auc: float
    seen_fraction: float
    recall: float
    seconds_per_keeper: float


def evaluate(session: Session, evaluation: Planted) -> Evaluation:
    """Rank the unseen run by its predictions and read each grid down to the run's cut."""
    rows = session.execute(
        select(Image.id, Job.item_id, func.coalesce(_probability(), 0.0))
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id == evaluation.run_id)
    ).all()
    probability = {int(image_id): float(p) for image_id, _, p in rows}
    cut = cut_for(list(probability.values())) or 0.0
    seen = [image_id for image_id, p in probability.items() if p >= cut]
    found = sum(evaluation.truth[image_id] for image_id in seen)
    keepers = sum(evaluation.truth.values())
    truth = [evaluation.truth[image_id] for image_id in probability]
    return Evaluation(
        auc=float(roc_auc_score(truth, list(probability.values()))),
        seen_fraction=len(seen) / len(probability),
        recall=found / max(keepers, 1),
        seconds_per_keeper=len(seen) / max(found, 1),
    )


def _probability():  # type: ignore[no-untyped-def]
    from db.ranking import KeeperPrediction

    return (
        select(KeeperPrediction.probability)
        .where(KeeperPrediction.image_id == Image.id)
        .scalar_subquery()
    )


def gpu_seconds_per_keeper(rng: np.random.Generator, items: int = 2000) -> tuple[float, float]:
    """(fixed, adaptive) GPU-seconds per keeper at 0.25 s an image, the same images rendered
    by both: an earlier night with an even split gives the decisions the budget learns from."""
    arms = [(template, "") for template in TEMPLATES]
    per_item = 12
    earlier = {
        arm: rng.binomial(items * per_item // len(arms), BUDGET_RATES[arm[0]]) for arm in arms
    }
    records = {
        arm: ArmRecord(arm[0], "", int(kept), items * per_item // len(arms) - int(kept))
        for arm, kept in earlier.items()
    }
    fixed = {arm: per_item // len(arms) for arm in arms}
    adaptive = allocate(arms, records, per_item, floor=1, seed_text="tonight").seeds
    results = []
    for seeds in (fixed, adaptive):
        keepers = sum(rng.binomial(items * seeds[arm], BUDGET_RATES[arm[0]]) for arm in arms)
        results.append(0.25 * items * sum(seeds.values()) / max(keepers, 1))
    return results[0], results[1]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run_checkpoints(
    sessions: sessionmaker[Session], scorer: Scorer, evaluation_items: int
) -> dict[int, Evaluation]:
    rng = np.random.default_rng(0)
    with sessions() as session:
        reviewer = add_reviewer(session, "simulated", "simulated reviewer password").id
        evaluation = plant_run(session, scorer, "evaluation", evaluation_items, rng)
        training = plant_run(session, scorer, "night", max(CHECKPOINTS) // CANDIDATES + 1, rng)
    results = {}
    for checkpoint in CHECKPOINTS:
        reached = review_until(sessions, training, reviewer, checkpoint, rng)
        with sessions() as session:
            started = time.perf_counter()
            outcome = train_keeper_model(session, SOURCE, min_decisions=min(checkpoint, 100))
            assert outcome.model is not None, outcome.reason
            predict_source(session, outcome.model, evaluation.run_id)
            session.commit()
            seconds = time.perf_counter() - started
            result = evaluate(session, evaluation)
            held_out = outcome.model.auc or float("nan")
        results[checkpoint] = result
        print(
            f"after {reached:>5} decisions: held-out AUC {held_out:.3f}, evaluation AUC "
            f"{result.auc:.3f}; seen {result.seen_fraction:6.1%} of candidates, "
            f"{result.recall:6.1%} of planted keepers found, "
            f"{result.seconds_per_keeper:.2f} reviewer-s/keeper (trained in {seconds:.1f} s)"
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="", help="default: a SQLite file")
    parser.add_argument("--evaluation-items", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pixelmill-ranking-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'ranking.db'}"
        upgrade(url)
        sessions = make_sessionmaker(make_engine(url))
        folder = build_tiny_scorer(Path(tmp) / "scorer")
        scorer = load_scorer(str(folder), head_path=folder / HEAD_FILE)
        results = run_checkpoints(sessions, scorer, args.evaluation_items)
    at_1000 = results[1000]
    print(
        f"candidates seen for 95% keeper recall after 1,000 decisions: "
        f"{at_1000.seen_fraction:.1%} with {at_1000.recall:.1%} found (goal <= 25% with >= 95%): "
        f"{verdict(at_1000.seen_fraction <= 0.25 and at_1000.recall >= 0.95)}"
    )
    print(
        f"reviewer-seconds per keeper after 1,000 decisions: {at_1000.seconds_per_keeper:.2f} "
        f"(goal < 2): {verdict(at_1000.seconds_per_keeper < 2)}"
    )
    fixed, adaptive = gpu_seconds_per_keeper(np.random.default_rng(1))
    saving = 1 - adaptive / fixed
    print(
        f"GPU-seconds per keeper: fixed {fixed:.2f}, adaptive {adaptive:.2f}, "
        f"{saving:.0%} fewer (goal >= 30%): {verdict(saving >= 0.30)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
