"""Tables and plots from a generated set of run records, checked against golden files.

Regenerate the golden files after an intended change of the output with
    UPDATE_GOLDEN=1 python -m pytest tests/test_report.py
and review the diff of tests/golden/.
"""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from peft_vit.report import build_table, load_records, to_csv, to_latex, to_markdown, vtab_tasks
from peft_vit.report.collect import DEFAULT_BACKBONE, group_rows
from peft_vit.report.plots import householder_entries, householder_groups, pareto_front, plot_accuracy_vs_params, \
    plot_householder_ranks
from peft_vit.methods.householder import EFFECTIVE_RANK_IS
from peft_vit.report.tables import PAPER_FILE, load_paper

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

# class counts (heads): docs/REFERENCE.md §2 for VTAB-1k and §3 for FGVC
VTAB_CLASSES = dict(cifar=100, caltech101=102, dtd=47, flowers=102, pets=37, svhn=10, sun397=397, camelyon=2,
                    eurosat=10, resisc45=45, retinopathy=5, clevr_count=8, clevr_dist=6, dmlab=6, kitti=4,
                    dsprites_loc=16, dsprites_ori=16, smallnorb_azi=18, smallnorb_ele=9)
FGVC_CLASSES = dict(cub=200, nabirds=555, flowers=102, dogs=120, cars=196)
NO_HEAD = dict(lora=294_912, householder=184_320, rlrr=288_768, linear=0)


# --------------------------------------------------------------------------- generator

def record(method, task, seed, acc, *, dataset="vtab", protocol="final", experiment=None, lr=1e-3, wd=1e-4,
           backbone=DEFAULT_BACKBONE, classes=None, diag=None, **extra):
    classes = classes if classes is not None else (VTAB_CLASSES if dataset == "vtab" else FGVC_CLASSES)[task]
    key = "test_acc" if protocol == "final" else "val_acc"
    split = "test" if protocol == "final" else "val200"
    r = {
        "method": method, "dataset": dataset, "task": task, "protocol": protocol, "seed": seed,
        "train_split": "train800val200" if protocol == "final" else "train800", "eval_split": split,
        key: round(acc, 2), "best_acc_over_epochs": round(acc + 1.25, 2), "best_epoch": 80,
        "best_acc_selects_on": split, "epochs": 100, "history": [{"epoch": 100, "acc": round(acc, 2)}],
        "trainable_params": NO_HEAD[method] + 769 * classes, "trainable_params_no_head": NO_HEAD[method],
        "total_params": 85_798_656 + 769 * classes, "experiment": experiment, "sweep": None,
        "config": {"protocol": protocol, "seed": seed, "method": {"name": method},
                   "dataset": {"name": dataset, "task": task, "num_classes": classes},
                   "model": {"name": backbone}, "optim": {"lr": lr, "weight_decay": wd},
                   "paths": {"output_root": "/somewhere/else"}},
    }
    if diag is not None:
        r[method] = diag
    r.update(extra)
    return r


def hta_diag(task_index, seed):
    rows = []
    for layer in range(12):
        for j, m in enumerate(["k", "o", "q", "v"]):  # out of order on purpose
            rows.append({"layer": layer, "matrix": m, "effective_rank": 10 + layer * 4 + j * 2 + task_index % 3 + seed,
                         "full_rank": 768})
    return {"effective_rank_is": EFFECTIVE_RANK_IS, "per_matrix": rows}


def write(root: Path, rel: str, rec: dict):
    p = root / rel / "results.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec))


def generate(root: Path):
    """2 complete methods × 19 tasks × 2 seeds, one incomplete method, a duplicate, a tune row, FGVC."""
    tasks = list(vtab_tasks())
    for i, t in enumerate(tasks):
        for seed in (0, 1):
            write(root, f"lora/{t}/s{seed}", record("lora", t, seed, 60 + i + 0.5 * seed, experiment="vtab_noah"))
            if not (t == "svhn" and seed == 1):   # one cell with a single seed
                write(root, f"householder/{t}/s{seed}",
                      record("householder", t, seed, 62 + i * 1.1 - 0.4 * seed, diag=hta_diag(i, seed)))
        if i % 3 != 2:  # rlrr: 13 of 19 tasks, seed 0 only
            write(root, f"rlrr/{t}/s0", record("rlrr", t, 0, 63 + i * 0.9, experiment="vtab_rlrr", lr=3e-3))
    # an earlier run of the same config in another directory: reported, counted once (the last
    # path in sorted order is kept: Hydra's timestamped run dirs sort oldest first)
    write(root, "a_earlier/lora/cifar/s0", record("lora", "cifar", 0, 99.0, experiment="vtab_noah"))
    # tune records (val200): their own row, never mixed with final
    for i, t in enumerate(tasks[:3]):
        write(root, f"tune/lora/{t}", record("lora", t, 0, 70 + i, protocol="tune", experiment="vtab_honest"))
    for i, t in enumerate(FGVC_CLASSES):
        write(root, f"fgvc/lora/{t}", record("lora", t, 0, 80 + i, dataset="fgvc"))
        write(root, f"fgvc/linear/{t}", record("linear", t, 0, 70 + i, dataset="fgvc"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    generate(root)
    return root


def check_golden(name: str, text: str):
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"golden file {path} missing; run UPDATE_GOLDEN=1 python -m pytest {__file__}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from tests/golden/{name} (UPDATE_GOLDEN=1 to regenerate)"


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("paper", [False, True])
def test_vtab_table_matches_golden(results, paper):
    col = load_records([results])
    t = build_table(col.records, "vtab", paper=paper)
    suffix = "_paper" if paper else ""
    check_golden(f"vtab{suffix}.md", to_markdown(t))
    check_golden(f"vtab{suffix}.csv", to_csv(t))
    check_golden(f"vtab{suffix}.tex", to_latex(t))


def test_fgvc_table_matches_golden(results):
    col = load_records([results])
    t = build_table(col.records, "fgvc", paper=True)
    check_golden("fgvc_paper.md", to_markdown(t))
    check_golden("fgvc_paper.csv", to_csv(t))


def _row(t, method, protocol, kind="ours"):
    """The one table row of ``method``, ``protocol`` and ``kind``."""
    rows = t.rows[(t.rows.method == method) & (t.rows.protocol == protocol) & (t.rows.kind == kind)]
    assert len(rows) == 1, t.rows[["label", "protocol"]]
    return rows.iloc[0]


def test_table_semantics(results):
    col = load_records([results])
    t = build_table(col.records, "vtab")
    tasks = list(vtab_tasks())
    lora = _row(t, "lora", "final/last-epoch")
    # mean ± std over seeds; the duplicate (99.0) is not counted
    assert lora["cifar"] == pytest.approx(60.25) and lora["cifar_n"] == 2
    assert lora["cifar_std"] == pytest.approx(0.3535534, abs=1e-6)
    assert lora["mean"] == pytest.approx(60.25 + 9)
    assert any(n.startswith("duplicate: vtab lora task=cifar seed=0") and "ignored a_earlier" in n for n in t.notes)
    # both protocols, never mixed: the max-over-epochs row is its own row
    lmax = _row(t, "lora", "final/max-over-epochs (selects on test)")
    assert lmax["cifar"] == pytest.approx(61.5)
    # mean of group means (NOAH's) and the plain mean (HTA/RLRR's)
    g = {grp: [i for i, x in enumerate(tasks) if vtab_tasks()[x] == grp] for grp in ("natural", "specialized", "structured")}
    gm = [sum(60.25 + i for i in ix) / len(ix) for ix in g.values()]
    assert lora["mean_of_groups"] == pytest.approx(sum(gm) / 3)
    # params: averaged over tasks, with and without head
    assert lora.params_no_head == pytest.approx(0.294912)
    assert lora.params_head == pytest.approx(0.294912 + 769 * 940 / 19 / 1e6)
    # a cell with fewer seeds is marked, and the means over it carry no std
    hta = _row(t, "householder", "final/last-epoch")
    assert hta["svhn_n"] == 1 and hta["cifar_n"] == 2 and f"| {hta['svhn']:.2f} (n=1) |" in to_markdown(t)
    assert pd.isna(hta["natural_std"]) and pd.notna(hta["structured_std"])
    # incomplete: blanks and no silent average
    rlrr = _row(t, "rlrr", "final/last-epoch")
    assert pd.isna(rlrr["dtd"]) and rlrr["dtd_n"] == 0
    assert pd.isna(rlrr["mean"]) and rlrr["mean_n"] == 13 and len(t.benchmark.spans["mean"]) == 19
    assert rlrr.partial
    assert "incomplete (13/19)" in to_markdown(t)
    # tune rows stay apart
    tune = _row(t, "lora", "tune/val")
    assert tune.experiment == "vtab_honest" and tune[["cifar", "caltech101", "dtd"]].notna().all()


def test_paper_rows_and_diff(results):
    col = load_records([results])
    t = build_table(col.records, "vtab", paper=True)
    p = _row(t, "lora", "paper: max test acc over epochs", kind="paper")
    assert p.experiment == "NOAH T1" and p.params_no_head == pytest.approx(0.29) and pd.isna(p.params_head)
    d = _row(t, "lora", "Δ final/max-over-epochs (selects on test) − paper", kind="diff")
    assert d["cifar"] == pytest.approx(61.5 - 67.1)
    assert not any((t.rows.kind == "diff") & t.rows.protocol.str.contains("tune"))
    # paper rows without any of ours are still listed (Full, Linear, Adapter, the * rows)
    assert set(zip(*(t.rows[t.rows.kind == "paper"][k] for k in ("method", "backbone")))) >= {
        ("full", DEFAULT_BACKBONE), ("adapter", DEFAULT_BACKBONE), ("householder", "vit_base_patch16_224.augreg_in21k")}


def test_paper_file_is_consistent():
    data = load_paper()
    assert PAPER_FILE.exists() and data["protocol"] == "paper: max test acc over epochs"
    tasks = list(vtab_tasks())
    for bench, names in (("vtab", tasks), ("fgvc", list(FGVC_CLASSES))):
        for r in data[bench]:
            assert list(r["acc"]) == names, (bench, r["label"])
            assert r["source"] and r["cite"] and r["params_include_head"] in (True, False, None)
            mean = sum(r["acc"].values()) / len(names)
            assert abs(mean - r["mean"]) <= 0.1 + 1e-9, (bench, r["label"], mean, r["mean"])
    # NOAH's own averages are means of the group means (NOAH Table 1: Adapter 73.9, LoRA 74.5)
    groups = vtab_tasks()
    for label, printed in (("Adapter", 73.9), ("LoRA", 74.5)):
        acc = next(r for r in data["vtab"] if r["label"] == label)["acc"]
        gm = [sum(acc[t] for t in tasks if groups[t] == g) / sum(groups[t] == g for t in tasks)
              for g in ("natural", "specialized", "structured")]
        assert abs(sum(gm) / 3 - printed) <= 0.11


def test_variants_split_rows_instead_of_averaging(tmp_path):
    write(tmp_path, "a", record("lora", "cifar", 0, 60.0, lr=1e-3))
    write(tmp_path, "b", record("lora", "cifar", 0, 70.0, lr=1e-2))
    notes = []
    long = group_rows(load_records([tmp_path]).records, ["last"], notes)
    assert long.row.tolist() == [0, 1] and long.label.tolist() == ["lora (optim.lr=0.001)", "lora (optim.lr=0.01)"]
    assert long.value.tolist() == [60.0, 70.0]
    assert any(n.startswith("split:") and "optim.lr" in n for n in notes)


def test_duplicates_ignore_paths_and_workers(tmp_path):
    a = record("lora", "cifar", 0, 60.0)
    b = record("lora", "cifar", 0, 61.0)
    b["config"]["paths"] = {"output_root": "/elsewhere"}
    b["config"]["trainer"] = {"num_workers": 8}
    write(tmp_path, "a", a)
    write(tmp_path, "b", b)
    notes = []
    long = group_rows(load_records([tmp_path]).records, ["last"], notes)
    assert long.row.tolist() == [0] and long.value.tolist() == [61.0]  # the last path is kept
    assert len([n for n in notes if n.startswith("duplicate")]) == 1


def script(name):
    """scripts/<name>.py as a module (run in-process: no second interpreter start-up)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_table_cli(results, tmp_path, capsys):
    out = tmp_path / "out"
    assert script("make_table").main([str(results), "--out", str(out), "--paper"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fgvc.csv", "fgvc.md", "fgvc.tex", "vtab.csv", "vtab.md", "vtab.tex"]
    assert (out / "vtab.md").read_text() == (GOLDEN / "vtab_paper.md").read_text()
    assert "duplicate" in capsys.readouterr().err


def test_benchmarks_follow_the_registries():
    """Task order, groups and heads come from peft_vit.data.{vtab,fgvc}, which follow docs/REFERENCE.md §2/§3."""
    from peft_vit.report.tables import benchmark_for

    v = benchmark_for("vtab")
    assert v.tasks == list(VTAB_CLASSES)
    assert {g: len(ts) for g, ts in v.groups.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert v.head_m == pytest.approx(769 * 940 / 19 / 1e6) and v.mean_title == "mean19"
    f = benchmark_for("fgvc")
    assert f.tasks == list(FGVC_CLASSES) and f.head_m == pytest.approx(769 * 1173 / 5 / 1e6)


# --------------------------------------------------------------------------- plots

def test_pareto_front():
    pts = [(0.3, 72.0), (0.2, 74.7), (0.3, 74.5), (85.8, 65.6), (0.04, 52.9), (0.33, 75.1)]
    assert pareto_front(pts) == [4, 1, 5]


def test_accuracy_vs_params_plot(results, tmp_path):
    col = load_records([results])
    t = build_table(col.records, "vtab", paper=True)
    data = plot_accuracy_vs_params(t, tmp_path / "vtab_acc_vs_params")
    for ext in ("png", "pdf", "json"):
        assert (tmp_path / f"vtab_acc_vs_params.{ext}").stat().st_size > 0
    assert json.loads((tmp_path / "vtab_acc_vs_params.json").read_text()) == data
    check_golden("vtab_acc_vs_params.json", json.dumps(data, indent=1) + "\n")
    protos = {p["protocol"] for p in data["points"]}
    assert protos == {"final/last-epoch", "final/max-over-epochs (selects on test)", "paper: max test acc over epochs"}
    assert all(p["source"] == "paper" for p in data["points"] if p["protocol"].startswith("paper"))
    assert any("rlrr" in s and "incomplete" in s for s in data["skipped"])  # incomplete rows get no point
    lora_paper = next(p for p in data["points"] if p["label"] == "lora [NOAH T1]")
    assert lora_paper["params_m"] == pytest.approx(0.29 + 769 * 940 / 19 / 1e6, abs=1e-6)  # printed w/o head


def test_householder_rank_plot(results, tmp_path):
    col = load_records([results])
    groups = householder_groups(col.records)
    assert list(groups) == ["vtab_final"]
    data = plot_householder_ranks(groups["vtab_final"], tmp_path / "hr", title="vtab_final")
    for ext in ("png", "pdf", "json"):
        assert (tmp_path / f"hr.{ext}").stat().st_size > 0
    assert data["matrices"] == ["q", "k", "v", "o"] and data["layers"] == list(range(12))
    assert len(data["tasks"]) == 19 and data["n_records"] == 37
    # layer 0, q (j=2): per task mean over seeds of 10 + 4 + (i % 3) + seed, then mean over tasks
    tasks = list(vtab_tasks())
    expect = []
    for i, t in enumerate(tasks):
        seeds = (0,) if t == "svhn" else (0, 1)
        expect.append(sum(10 + 4 + i % 3 + s for s in seeds) / len(seeds))
    assert data["mean_effective_rank"][0][0] == pytest.approx(sum(expect) / len(expect), abs=1e-6)
    check_golden("householder_rank.json", json.dumps(data, indent=1) + "\n")


def test_householder_ranks_of_different_definitions_are_not_averaged(tmp_path):
    """An older record's rank (a cut at rank_threshold · max|d|) gets its own group."""
    write(tmp_path, "new", record("householder", "cifar", 0, 60.0, diag=hta_diag(0, 0)))
    old = hta_diag(1, 0)
    del old["effective_rank_is"]
    write(tmp_path, "old", record("householder", "dtd", 0, 60.0, diag={"rank_threshold": 0.01, **old}))
    groups = householder_groups(load_records([tmp_path]).records)
    assert {k: [r.task for r in v] for k, v in groups.items()} == {
        "vtab_final_energy_rank_90": ["cifar"], "vtab_final_rank_above_1pct_max": ["dtd"]}
    data = plot_householder_ranks(groups["vtab_final_rank_above_1pct_max"], tmp_path / "old", title="old")
    assert data["effective_rank_is"] == ["rank_above_1pct_max: #|d_i| > 0.01·max|d|"]


def test_householder_entries_tolerant():
    rows = [{"layer": 1, "matrix": "q", "effective_rank": 5}]
    assert householder_entries({"per_matrix": rows}) == [(1, "q", 5.0)]
    assert householder_entries({"layers": rows}) == [(1, "q", 5.0)]
    assert householder_entries(rows) == [(1, "q", 5.0)]
    assert householder_entries({"blocks.3.attn.q": {"effective_rank": 7}}) == [(3, "q", 7.0)]
    assert householder_entries({"3": {"q": 7, "v": 2}}) == [(3, "q", 7.0), (3, "v", 2.0)]
    assert householder_entries(None) == [] and householder_entries({"rank_threshold": 0.01}) == []


def test_plot_cli(results, tmp_path):
    assert script("plot_results").main([str(results), "--out", str(tmp_path), "--paper"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    for stem in ("vtab_acc_vs_params", "fgvc_acc_vs_params", "householder_rank_vtab_final"):
        assert {f"{stem}.png", f"{stem}.pdf", f"{stem}.json"} <= set(names)


def test_householder_entries_read_the_method_report():
    """The rank plot reads what HouseholderMethod.report() writes into results.json."""
    from conftest import build

    model = build("householder")
    diag = json.loads(json.dumps(model.peft_method.report(model)))
    rows = householder_entries(diag)
    assert rows and {m for _, m, _ in rows} == {"q", "k", "v", "o"} and {layer for layer, _, _ in rows} == {0, 1}


# --------------------------------------------------------------------------- input checks

def test_dataset_with_a_slash_gets_a_safe_output_name(tmp_path, capsys):
    """A record whose dataset is 'vtab/caltech101' renders into vtab_caltech101.* inside --out."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in (0, 1):
        write(runs, f"s{seed}", record("lora", "caltech101", seed, 80.0 + seed, dataset="vtab/caltech101", classes=102))
    assert script("make_table").main([str(runs), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vtab_caltech101.csv", "vtab_caltech101.md",
                                                     "vtab_caltech101.tex"]
    md = (out / "vtab_caltech101.md").read_text()
    assert md.startswith("## vtab/caltech101 — ") and "| lora | final/last-epoch |  | 80.50 ± 0.71 |" in md
    assert script("plot_results").main([str(runs), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "vtab_caltech101_acc_vs_params.json").is_file()


def test_safe_stems_stay_inside_and_distinct():
    from peft_vit.report.tables import safe_stems

    stems = safe_stems(["vtab", "vtab/caltech101", "vtab_caltech101", "../../etc", "a b"])
    assert stems["vtab"] == "vtab" and stems["../../etc"] == "etc" and stems["a b"] == "a_b"
    assert stems["vtab/caltech101"] != stems["vtab_caltech101"]
    assert all(s.startswith("vtab_caltech101_") for k, s in stems.items() if "caltech" in k)
    assert len(set(stems.values())) == len(stems) and not any("/" in s or s.startswith(".") for s in stems.values())


MALFORMED = {  # dir -> (record or raw text, what the message must say)
    "no_task": (lambda r: r.pop("task"), "missing 'task'"),
    "seed_str": (lambda r: r.update(seed="0"), "'seed' is str, expected int"),
    "acc_str": (lambda r: r.update(test_acc="61"), "'test_acc' is str, expected int or float"),
    "no_acc": (lambda r: r.pop("test_acc"), "missing 'test_acc'"),
    "protocol": (lambda r: r.update(protocol="eval"), "'protocol' is 'eval', expected tune or final"),
    "dataset_empty": (lambda r: r.update(dataset=""), "'dataset' is empty"),
    "config_list": (lambda r: r.update(config=[1]), "'config' is list, expected dict"),
    "acc_nan": (lambda r: r.update(test_acc=float("nan")), "'test_acc' is nan, expected a finite number"),
}


@pytest.fixture
def malformed(tmp_path):
    root = tmp_path / "runs"
    write(root, "good", record("lora", "cifar", 0, 60.0))
    for name, (edit, _) in MALFORMED.items():
        r = record("lora", "cifar", 0, 60.0)
        edit(r)
        write(root, name, r)
    write(root, "a_list", [1, 2])
    (root / "truncated").mkdir()
    (root / "truncated" / "results.json").write_text('{"method": "lora", ')
    return root


def test_malformed_records_are_named_and_skipped(malformed):
    col = load_records([malformed])
    assert [r.path for r in col.records] == ["good/results.json"]
    assert len(col.issues) == len(MALFORMED) + 2
    for name, (_, why) in MALFORMED.items():
        assert any(i.startswith(f"malformed {name}/results.json: ") and why in i for i in col.issues), (name, col.issues)
    assert "malformed a_list/results.json: not a JSON object" in col.issues
    assert any(i.startswith("unreadable truncated/results.json: ") for i in col.issues)


def test_make_table_skips_malformed_or_refuses_with_strict(malformed, tmp_path, capsys):
    out = tmp_path / "out"
    assert script("make_table").main([str(malformed), "--out", str(out), "--format", "md"]) == 0
    err = capsys.readouterr().err
    assert "warning: malformed seed_str/results.json: 'seed' is str, expected int (skipped)" in err
    md = (out / "vtab.md").read_text()
    assert "| lora | final/last-epoch |  | 60.00 |" in md and "- malformed no_task/results.json: missing 'task'" in md
    strict = tmp_path / "strict"
    assert script("make_table").main([str(malformed), "--out", str(strict), "--strict"]) == 2
    assert f"refusing: {len(MALFORMED) + 2} malformed record(s)" in capsys.readouterr().err and not strict.exists()
