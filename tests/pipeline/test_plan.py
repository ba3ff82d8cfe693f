from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from carv_attrib.carv.timesteps import Proposal
from carv_attrib.errors import UsageError
from carv_attrib.pipeline.featurize import FeaturizeConfig, run_featurize
from carv_attrib.pipeline.plan import PlanConfig, run_plan
from carv_attrib.store.records import PlanDoc
from carv_attrib.store.shards import ShardStore


@pytest.fixture(scope="module")
def plan(
    encoded_run: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("plan")
    cfg = PlanConfig(
        run=encoded_run,
        model=str(tiny_model_dir),
        out=out / "plan.json",
        plot=out / "plan.png",
        pilot_clips=3,
        bins=4,
        draws=2,
        replicates=3,
        device="cpu",
    )
    return run_plan(cfg), out


def test_plan_reports_costs_variances_and_a_usable_proposal(plan: tuple[dict, Path]) -> None:
    result, out = plan
    assert json.loads((out / "plan.json").read_text()) == result
    assert (out / "plan.png").stat().st_size > 10_000
    assert result["costs"]["c_enc"] > 0 and result["costs"]["c_draw"] > 0
    assert result["costs"]["c_enc_source"] == "timed re-encode of the pilot clips"
    assert set(result["schemes"]) == {
        "iid",
        "stratified",
        "stratified-is",
        "iid+antithetic",
        "stratified-is+antithetic",
    }
    assert result["schemes"]["iid"]["variance_ratio_vs_iid"] == 1.0
    assert result["schemes"]["iid"]["ecm"]["1"] == pytest.approx(1.0)
    for row in result["schemes"].values():
        assert row["within_variance_per_draw"] > 0
        ecms = list(row["ecm"].values())
        assert ecms == sorted(ecms), "with σ_b² = 0, ECM grows with K"
    q = Proposal.from_json(result["proposal"])
    assert q.density == "uniform" and q.n_bins == 4
    m2 = np.array(result["bins"]["second_moment"])
    assert m2.shape == (4,) and (m2 > 0).all()
    s = np.linspace(0.01, 0.99, 99)
    assert (q.pdf(s).numpy() >= 0.1 - 1e-12).all(), "mixed with p: q >= α p"
    assert result["recommended"]["scheme"] in {"iid", "stratified", "stratified-is"}
    assert 1 <= result["recommended"]["draws"] <= 64


def test_featurize_consumes_the_plan(
    plan: tuple[dict, Path], encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result, out = plan
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    run_featurize(
        FeaturizeConfig(run=run, model=str(tiny_model_dir), draws=4, plan=out / "plan.json", device="cpu")
    )
    cfg = ShardStore(run, "features").read_config()["config"]
    assert cfg["draws"]["proposal"] == Proposal.from_json(result["proposal"]).fingerprint
    t = ShardStore(run, "features").read_table()
    w = np.array(t.column("weights").to_pylist()[0])
    assert not np.allclose(w, 1.0), "importance weights p/q differ from 1 under a fitted proposal"
    assert (w <= 1 / 0.1 + 1e-9).all(), "weights bounded by 1/α"
    with pytest.raises(UsageError, match="stratified-is"):
        run_featurize(
            FeaturizeConfig(
                run=run,
                model=str(tiny_model_dir),
                draws=4,
                timesteps="iid",
                plan=out / "plan.json",
                device="cpu",
            )
        )
    with pytest.raises(UsageError, match="fitted for --output-fn loss, not sqnorm"):
        run_featurize(
            FeaturizeConfig(
                run=run,
                model=str(tiny_model_dir),
                draws=4,
                output_fn="sqnorm",
                plan=out / "plan.json",
                device="cpu",
            )
        )


def test_recommended_k_follows_the_noise_not_the_cap() -> None:
    from carv_attrib.attrib.pilot import NOISE_SHARE
    from carv_attrib.attrib.pilot import recommend as _recommend
    from carv_attrib.carv.accounting import Costs

    costs = Costs(c_enc=1.0, c_draw=0.01)  # amortisation alone would ask for K = 900
    v = {
        "iid": {"stored": 2.0, "raw": 1.0, "signal": 1.0},
        "stratified": {"stored": 0.5, "raw": 1.0, "signal": 1.0},
    }
    r = _recommend(v, costs, k_max=64)
    assert r["scheme"] == "stratified" and r["draws"] == 5 and not r["capped"]  # 0.5 / K ≤ 0.1 · 1.0
    assert r["noise_share_at_draws"] <= NOISE_SHARE and r["draws_for_90pct_amortisation"] == 900
    r = _recommend(v, costs, k_max=4)
    assert r["draws"] == 4 and r["capped"] and r["noise_share_at_draws"] > NOISE_SHARE


class _NoisyFeaturizer:
    """Features = a fixed signal + noise of sd 1/sqrt(K), seeded by the rule: what a K-draw estimate
    does, without a model."""

    def __init__(self, n: int, d: int = 16) -> None:
        self.signal = np.random.default_rng(0).standard_normal((n, d)) * np.linspace(0.2, 3.0, n)[:, None]
        self.rule = None

    def use_rule(self, rule) -> None:
        self.rule = rule

    def features(self, clips):
        import torch

        rng = np.random.default_rng([self.rule.seed, self.rule.k])
        noise = rng.standard_normal(self.signal.shape) * 0.5 / np.sqrt(self.rule.k)
        rows = [c[0] for c in clips]
        return torch.from_numpy(self.signal[rows] + noise[rows]), None, None


def test_ranking_rule_recommends_the_first_k_where_two_seeds_agree() -> None:
    from types import SimpleNamespace

    from carv_attrib.attrib.pilot import ranking_draws
    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.search.stability import is_stable

    n = 31
    clips = [SimpleNamespace(clip_id=i, latent=None, text_emb=None, motion=None) for i in range(n)]
    rule = DrawRule(seed=0, scheme="stratified", k=8, density="uniform")
    out = ranking_draws(_NoisyFeaturizer(n), clips, rule, "identity", k_max=256)
    assert out["stable"] and out["top_k"] == 10 and out["clips"] == n
    ks = [c["draws"] for c in out["curve"]]
    assert ks == sorted(ks) and ks[-1] == out["draws"] and ks[0] == 1
    verdicts = [is_stable(c["top_k_overlap"], c["spearman"]) for c in out["curve"]]
    assert verdicts[-1] and not any(verdicts[:-1]), "stops at the first stable K"
    capped = ranking_draws(_NoisyFeaturizer(n), clips, rule, "identity", k_max=2)
    assert not capped["stable"] and capped["draws"] == 2


def test_plan_states_its_cost_first_and_counts_its_draws_right(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "cost" event comes before any pilot step, and the draws it announces are the draws the
    pilot differentiates (counted at the two places draws happen), within its stated range."""
    import carv_attrib.attrib.pilot as pilot
    from carv_attrib.attrib.featurizer import Featurizer

    counted = {"draws": 0}
    real_features, real_per_draw = Featurizer.features, pilot.per_draw_features

    def features(self, clips, *a, **k):  # type: ignore[no-untyped-def]
        counted["draws"] += len(clips) * self.rule.k  # K per clip, antithetic pairs included
        return real_features(self, clips, *a, **k)

    def per_draw(transformer, projector, latent, context, sigma, *a, **k):  # type: ignore[no-untyped-def]
        counted["draws"] += sigma.numel()
        return real_per_draw(transformer, projector, latent, context, sigma, *a, **k)

    monkeypatch.setattr(Featurizer, "features", features)
    monkeypatch.setattr(pilot, "per_draw_features", per_draw)
    events: list[tuple[str, dict]] = []
    cfg = PlanConfig(
        run=encoded_run, model=str(tiny_model_dir), out=tmp_path / "plan.json", pilot_clips=3, bins=4,
        draws=2, replicates=2, rank_clips=6, k_max=4, device="cpu",
    )  # fmt: skip
    dry = run_plan(PlanConfig(**{**cfg.__dict__, "dry_run": True}), lambda e, i: events.append((e, i)))
    assert dry["dry_run"] and [e for e, _ in events] == ["cost"] and not (tmp_path / "plan.json").exists()
    est = dry["estimate"]
    assert est["draws"]["proposal"] == 3 * 4 * 2 and est["draws"]["variances"] == 5 * 2 * 3 * 2
    assert est["rank_clips"] == 6 and est["draws"]["total_max"] == 24 + 60 + 6 * 2 * (1 + 2 + 4)
    assert 0 < est["seconds_min"] <= est["seconds_max"]

    events.clear()
    counted["draws"] = 0
    run_plan(cfg, lambda e, i: events.append((e, i)))
    assert events[0][0] == "cost" and events[1][0] == "start"
    pilot_draws = counted["draws"] - events[0][1]["timed_clips"] * cfg.draws  # less the timed batch
    d = events[0][1]["draws"]
    assert d["total_min"] <= pilot_draws <= d["total_max"]


def test_cli_plan_dry_run_prints_the_cost_and_writes_nothing(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from carv_attrib.cli.app import app

    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = CliRunner().invoke(
        app, ["plan", str(run), "-m", str(tiny_model_dir), "--dry-run", "--pilot-clips", "2", "--device", "cpu",
              "-o", str(tmp_path / "plan.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "plan: pilot of 2 clips" in res.output and "would take about" in res.output
    assert "--replicates" in res.output
    assert not (tmp_path / "plan.json").exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_plan_pilots_a_lora_adapter_and_featurize_takes_the_plan(
    encoded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.pipeline.test_lora_attribution import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    cfg = PlanConfig(
        run=encoded_run, model=str(tiny_model_dir), out=tmp_path / "plan.json", pilot_clips=2, bins=2, draws=2,
        replicates=2, rank_clips=4, k_max=2, device="cpu", lora=adapter,
    )  # fmt: skip
    doc = run_plan(cfg)
    assert doc["projector"]["lora"] is True and len(doc["lora"]["weights_sha256"]) == 64
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    s = run_featurize(
        FeaturizeConfig(run=run, model=str(tiny_model_dir), device="cpu", lora=adapter, timesteps="stratified-is",
                        draws=2, plan=tmp_path / "plan.json", batch_clips=4)
    )  # fmt: skip
    assert s.computed == 8
    with pytest.raises(UsageError, match="--lora or --layers"):
        PlanConfig(run=encoded_run, model="m", lora=adapter, layers=["blocks.0.*"]).validate()
    # a plan is for the gradients it piloted: the adapter's plan is refused without it or with another
    # adapter, and a plan of the model's own layers is refused for --lora (before any work)
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=2)
    for lora, text in (
        (None, "fitted on a LoRA adapter's gradients"),
        (other, "fitted on another LoRA adapter"),
    ):
        with pytest.raises(UsageError, match=text):
            run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), device="cpu", lora=lora,
                                          timesteps="stratified-is", plan=tmp_path / "plan.json", overwrite=True))  # fmt: skip
    full_plan = PlanDoc.read(tmp_path / "plan.json")
    full = tmp_path / "full-plan.json"
    full.write_text(json.dumps(full_plan.to_dict() | {"lora": None}))
    with pytest.raises(UsageError, match="fitted on the model's own layers, not on the adapter"):
        run_featurize(FeaturizeConfig(run=run, model=str(tiny_model_dir), device="cpu", lora=adapter,
                                      timesteps="stratified-is", plan=full, overwrite=True))  # fmt: skip
