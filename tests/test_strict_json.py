"""metrics.jsonl and each item's metrics.json are strict JSON: a metric that is not finite (the PSNR inf of
identical images, a NaN) is written ``null``, never a bare ``NaN`` or ``Infinity`` that strict readers refuse."""

import json
import math

from diffinv import output


def strict_loads(text: str):
    """json.loads as a strict reader (JavaScript's JSON.parse, jq, most databases) reads: NaN and Infinity refused."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def not_finite_line(item: str = "car") -> dict:
    """A reconstruction's line as the writer's callback hands it over: PSNR "inf" (identical images), SSIM NaN,
    MSE and an unedited PSNR infinite, beside finite and unavailable values."""
    return {"id": item, "kind": "reconstruction", "image_path": f"{item}/reconstruction.png", "psnr": "inf",
            "ssim": float("nan"), "mse": math.inf, "psnr_unedited": -math.inf, "lpips_alex": "unavailable",
            "seconds": 1.5, "source_prompt": "nan", "note": [1.0, float("nan")]}


def test_metrics_jsonl_lines_are_strict_json_with_null_for_not_finite(tmp_path):
    output.append_lines(tmp_path, [not_finite_line()])
    (text,) = (tmp_path / output.INDEX).read_text().splitlines()
    line = strict_loads(text)
    assert line["psnr"] is None and line["ssim"] is None and line["mse"] is None and line["psnr_unedited"] is None
    assert line["seconds"] == 1.5 and line["lpips_alex"] == "unavailable" and line["note"] == [1.0, None]
    assert line["source_prompt"] == "nan"  # a caption is text, not a metric: kept as written


class FakeRecord:
    """Stands in for an Inversion: saving it marks the item finished."""

    def save(self, path):
        path.write_bytes(b"x")


def test_an_items_metrics_json_is_strict_json_too(tmp_path):
    output.write_item(tmp_path, "car", {}, [not_finite_line()], FakeRecord())
    (line,) = strict_loads((tmp_path / "car" / "metrics.json").read_text())
    assert line["psnr"] is None and line["ssim"] is None
    strict_loads((tmp_path / output.INDEX).read_text().splitlines()[0])


def test_reconcile_rewrites_an_older_files_bare_nan_as_null_and_counts_nothing_changed(tmp_path):
    """An index written before this rule (bare NaN, "inf" strings) is read, and rewritten in strict JSON; its lines
    are the same lines, so none is reported restored or dropped."""
    (tmp_path / "car").mkdir()
    (tmp_path / "car" / output.DONE_MARKER).write_bytes(b"x")
    old = not_finite_line()
    (tmp_path / "car" / "metrics.json").write_text(json.dumps([old]))
    (tmp_path / output.INDEX).write_text(json.dumps(old) + "\n")
    assert "NaN" in (tmp_path / output.INDEX).read_text()
    assert output.reconcile_metrics(tmp_path) == (0, 0)
    line = strict_loads((tmp_path / output.INDEX).read_text())
    assert line["ssim"] is None and line["psnr"] is None
    assert output.reconcile_metrics(tmp_path) == (0, 0)


def test_one_representation_null_for_nan_and_both_infinities():
    for value in (math.nan, math.inf, -math.inf, "inf", "nan", "-inf"):
        assert output.json_line({"id": "x", "psnr": value}) == '{"id": "x", "psnr": null}'
