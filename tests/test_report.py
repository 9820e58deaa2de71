"""The search report: one-line arch summaries per family, the spaces' reference models (declared, validated,
exported beside the front), and `write_report` (Markdown tables of summaries, the plot, Parquet with full archs)."""

import copy
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import timm

from raynas import storage
from raynas.hw.onnx_export import verified_onnx
from raynas.report.pareto_report import write_report
from raynas.report.references import reference_points
from raynas.search.driver import estimate_fn
from raynas.search.runner import export_and_measure
from raynas.space import Arch, Dim, SearchSpace, SpaceError, load_space, space_from_config
from raynas.space.loader import builtin_spaces_dir, read_space_yaml
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost

MNV3_LARGE = "r224 w1|d2 k3 e4|d3 k5 e4|d4 k3 e6222|d2 k3 e6|d3 k5 e6"
S0 = "stem g|32x2 u k3 e4 g|48x2 u k3 e4 g|96x6 u k3 e433344 g m000044g|ds e4g 176x4 u k3 e4334 g m0044g"


# ---- one-line summaries ------------------------------------------------------------------------------
def test_reference_summaries_of_the_three_spaces():
    summaries = {name: {r: load_space(name).arch_summary(ref.arch) for r, ref in load_space(name).references.items()}
                 for name in ("mbv3-biglittle", "scanedge", "autoformer-t")}
    assert summaries == {"mbv3-biglittle": {"mobilenetv3-large": MNV3_LARGE},
                         "scanedge": {"efficientformerv2-s0": S0},
                         "autoformer-t": {"deit-tiny": "192x12 h3 r4"}}


def test_mbv3_summary_lists_only_the_blocks_within_depth():
    space = load_space("mbv3-biglittle")
    arch = space.validate({**space.max_arch().to_dict(), "width": 0.75, "resolution": 160, "stage2.depth": 2,
                           "stage2.b0.kernel": 3, "stage2.b1.expand": 4, "stage5.depth": 1})
    assert space.arch_summary(arch) == "r160 w0.75|d4 k7 e6|d2 k37 e64|d4 k7 e6|d4 k7 e6|d1 k7 e6"


def test_autoformer_summary_with_mixed_blocks():
    space = load_space("autoformer-t")
    values = {**space.min_arch().to_dict(), "embed_dim": 216, "depth": 13, "b1.heads": 4, "b2.mlp_ratio": 4.0}
    assert space.arch_summary(space.validate(values)) == \
        "216x13 h3433333333333 r3.5/3.5/4/3.5/3.5/3.5/3.5/3.5/3.5/3.5/3.5/3.5/3.5"


def test_summaries_of_the_other_families():
    uib = load_space("khyper-uib")
    assert uib.arch_summary(uib.named_arch("khyper-s")) == \
        "16x2 I3 F|24x2 X33 X53|48x3 X53 X55 C5|88x2 X53 I5|112x3 I3 C3 X55|192x3 I5 C3 I5|320x1 F"
    vit = load_space("autovit-xxs")
    assert vit.arch_summary(vit.min_arch()) == "s16|16x1|24x2|32x2|T48x2 h2 r1.5|T64x2 h2 r1.5|T80x2 h2 r1.5|head1000"
    nb201 = load_space("nb201")
    resnet = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|"
    assert nb201.arch_summary(nb201.from_arch_str(resnet)) == resnet  # the benchmark's own spelling


def test_generic_summary_groups_fields_that_differ_by_number():
    space = SearchSpace("plain", "none", (Dim("s1.b0.k", (3, 5)), Dim("s1.b1.k", (3, 5)), Dim("s2.b0.k", (3, 5)),
                                          Dim("ratio", (3.5, 4.0)), Dim("act", ("relu", "gelu"))))
    arch = space.validate({"s1.b0.k": 3, "s1.b1.k": 5, "s2.b0.k": 5, "ratio": 4.0, "act": "gelu"})
    assert space.arch_summary(arch) == "s#.b#.k=355 ratio=4 act=gelu"


# ---- reference models --------------------------------------------------------------------------------
def test_mobilenetv3_large_reference_costs_what_timm_counts():
    """Params within 0.2% of timm's mobilenetv3_large_100; MACs 5% above (expansion 3 is 4 in this space)."""
    space = load_space("mbv3-biglittle")
    ours = build_supernet(space).cost(space.references["mobilenetv3-large"].arch)
    timm_cost = count_cost(timm.create_model("mobilenetv3_large_100").eval(), (1, 3, 224, 224))
    assert ours == {"params": 5490456, "macs": 227591264}
    assert abs(ours["params"] / timm_cost["params"] - 1) < 0.002
    assert 1.0 < ours["macs"] / timm_cost["macs"] < 1.06


def test_reference_follows_a_resolution_override():
    space = load_space("mbv3-biglittle", resolution=32)  # `resolution: max` is the fixed 32
    assert space.arch_summary(space.references["mobilenetv3-large"].arch) == MNV3_LARGE.replace("r224", "r32")


@pytest.fixture(scope="module")
def scanedge_cfg():
    return read_space_yaml(builtin_spaces_dir() / "scanedge.yaml")


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update({"stage1.width": 30}), "space scanedge.references.efficientformerv2-s0: arch field "
     "'stage1.width': 30 is not allowed; allowed: [24, 28, 32, 36]"),
    (lambda a: a.pop("stage4.depth"), "space scanedge.references.efficientformerv2-s0: arch field "
     "'stage4.depth': missing"),
    (lambda a: a.update({"stage9.b*.kernel": 3}), "space scanedge.references.efficientformerv2-s0.arch."
     "stage9.b*.kernel: matches no field; allowed: patterns over the fields of space 'scanedge'"),
    (lambda a: a.update({"stage3.b*.kernel": 5}), "space scanedge.references.efficientformerv2-s0.arch."
     "stage3.b*.kernel: gives 'stage3.b0.kernel' 5 where '*.kernel' gives 3; allowed: patterns that agree"),
    (lambda a: a.update({"stem.colour": "red"}), "space scanedge.references.efficientformerv2-s0: arch field "
     "'stem.colour': unknown in space 'scanedge'"),
])
def test_bad_reference_is_one_line_naming_it(scanedge_cfg, edit, message):
    cfg = copy.deepcopy(scanedge_cfg)
    edit(cfg["references"]["efficientformerv2-s0"]["arch"])
    with pytest.raises(SpaceError) as err:
        space_from_config(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_reference_declaration_errors_name_the_field(scanedge_cfg):
    for refs, message in ((["s0"], "space scanedge.references: expected a mapping"),
                          ({"s0": {"description": "no arch"}}, "space scanedge.references.s0.arch: missing"),
                          ({"s0": {"arch": {}, "paper": 1}}, "space scanedge.references.s0.paper: unknown field")):
        with pytest.raises(SpaceError) as err:
            space_from_config({**scanedge_cfg, "references": refs})
        assert str(err.value).startswith(message)


def test_references_are_exported_under_their_own_folder(tmp_path):
    """The reference is predicted with the search's estimate and exported by the run's export function (here
    `export_and_measure` writing a real verified ONNX, not measured), its files apart from the front's."""
    space = load_space("mbv3-biglittle", resolution=32, num_classes=10)
    supernet = build_supernet(space).eval()

    def deployed(arch_jsons):
        for arch in arch_jsons:
            verified = verified_onnx(supernet.extract(Arch.from_json(arch)), supernet.input_shape(1))
            yield arch, (verified.model, {"precision": "fp32", "onnx_max_abs_diff": verified.info["max_abs_diff"]})

    def export(chosen, where, precision):
        return export_and_measure(chosen, where, supernet.input_shape(1), deployed, None, None, precision)

    [ref] = reference_points(space, estimate_fn(supernet), str(tmp_path), export)
    arch = space.references["mobilenetv3-large"].arch
    assert ref["reference"] == "mobilenetv3-large" and ref["arch"] == arch.to_json()
    assert (ref["params"], ref["macs"]) == tuple(supernet.cost(arch).values())
    assert ref["onnx"] == "references/onnx/subnet_0.onnx" and (tmp_path / ref["onnx"]).is_file()
    assert ref["precision"] == "fp32" and ref["onnx_max_abs_diff"] < 1e-4 and ref["accuracy"] is None
    assert not (tmp_path / "onnx").exists()  # the front's folder is the front's only
    assert reference_points(load_space("autovit-xxs"), estimate_fn(supernet), str(tmp_path), export) == []


# ---- write_report ------------------------------------------------------------------------------------
def _records(space, n=24):
    """Hand-made evaluations: accuracy grows with the number of blocks, latency with kernels x expansions."""
    rng = np.random.default_rng(0)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(n)))
    records = []
    for i, a in enumerate(archs):
        depth = sum(v for k, v in a.items() if k.endswith("depth"))
        work = sum(v for k, v in a.items() if k.endswith(("kernel", "expand")))
        records.append({"arch": a.to_json(), "accuracy": 0.5 + depth / 60 + 0.01 * (i % 3), "latency_ms": work / 10,
                        "latency_source": "model", "params": 1000 * depth, "macs": 10**5 * work,
                        "generation": i // 8, "feasible": i % 7 != 3})
    return records


def _green_pixels(png_path) -> int:
    """Pixels of the references' colour (matplotlib C2, #2ca02c) in the plot."""
    image = plt.imread(png_path)[..., :3]
    return int((np.abs(image - np.array([0x2C, 0xA0, 0x2C]) / 255).max(axis=-1) < 0.02).sum())


def test_write_report_shows_summaries_plots_references_and_keeps_full_archs(tmp_path):
    from raynas.search.pareto import pareto_front

    space = load_space("mbv3-biglittle", resolution=32)
    records = _records(space)
    front = pareto_front([r for r in records if r["feasible"]], ("accuracy", "latency_ms"))
    exported = [{**r, "onnx": f"onnx/subnet_{i}.onnx", "measured_ms": r["latency_ms"] * 1.2, "measured_iqr_ms": 0.1}
                for i, r in enumerate(front[:2])]
    mnv3 = space.references["mobilenetv3-large"].arch
    references = [{"reference": "mobilenetv3-large", "description": "shaped", "arch": mnv3.to_json(),
                   "accuracy": 0.7, "latency_ms": 9.0, "measured_ms": 11.0, "measured_iqr_ms": 0.2,
                   "precision": "int8", "params": 5490456, "macs": 8 * 10**6, "onnx": "references/onnx/subnet_0.onnx"},
                  {"reference": "unscored", "arch": mnv3.to_json(), "accuracy": None, "latency_ms": 5.0}]
    summary = {"space": space.name, "algorithm": "nsga2", "front": len(front)}
    report = write_report(tmp_path / "with", summary, records, front, exported, space=space, references=references)
    text = storage.read_text(report)

    # Tables show summaries, their pipes escaped so rows keep their columns; no arch JSON in the Markdown.
    assert all(space.arch_summary(Arch.from_json(r["arch"])).replace("|", "\\|") in text for r in front)
    assert MNV3_LARGE.replace("r224", "r32").replace("|", "\\|") in text and '{"resolution"' not in text
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == 4  # summary, front, exported, references
    assert all(len({line.replace("\\|", "").count("|") for line in table}) == 1 for table in tables)
    section = text[text.index("## Reference models"):]
    assert "| mobilenetv3-large | shaped | 0.7 | 9 | 11 | 0.2 | int8 |" in section

    # report.parquet: the front (exported members with their measurement) and the references, full archs.
    table = storage.read_pandas(tmp_path / "with" / "report.parquet")
    assert list(table["role"]) == ["front"] * len(front) + ["reference"] * 2
    assert list(table["arch"]) == [r["arch"] for r in front] + [mnv3.to_json()] * 2
    assert all(space.validate(json.loads(a)) == Arch.from_json(a) for a in table["arch"])
    assert list(table["arch_summary"][:2]) == [space.arch_summary(Arch.from_json(r["arch"])) for r in front[:2]]
    assert list(table["measured_ms"][:2]) == pytest.approx([r["measured_ms"] for r in exported])
    assert table["measured_ms"][2:len(front)].isna().all()

    # The plot draws the references (the only green); without them there is none.
    assert _green_pixels(tmp_path / "with" / "pareto.png") > 50
    write_report(tmp_path / "without", summary, records, front, exported, space=space)
    assert _green_pixels(tmp_path / "without" / "pareto.png") == 0
    assert "## Reference models" not in (tmp_path / "without" / "report.md").read_text()


def test_spaces_show_lists_the_references_as_summaries(capsys):
    from raynas.cli import main

    assert main(["spaces", "show", "mbv3-biglittle"]) == 0
    refs = json.loads(capsys.readouterr().out)["references"]
    assert refs["mobilenetv3-large"]["arch"] == MNV3_LARGE
