"""The training benchmarks run end to end at tiny sizes and write well-formed records."""
from __future__ import annotations

import json

from fvdm.cli import main


def test_bench_vae_and_decode_records(tmp_path):
    results = tmp_path / "results.json"
    common = ["--preset", "tiny", "--workers", "1", "--batch-size", "2", "--num-points", "256",
              "--results", str(results)]
    assert main(["bench", "vae", "--minutes", "0.1", "--steps", "3", "--shapes", "6", "--num-surface", "512",
                 "--resolution", "24", "--data", str(tmp_path / "vae-data"), "--run-root", str(tmp_path / "runs"),
                 *common]) == 0
    assert main(["bench", "decode", "--train-minutes", "0.05", "--resolution", "48", "--train-shapes", "6",
                 "--eval-shapes", "1", "--timing-shapes", "1", "--repeats", "1",
                 "--data", str(tmp_path / "decode-data"), "--run-root", str(tmp_path / "runs"), *common]) == 0
    vae, decode = json.loads(results.read_text())
    assert vae["bench"] == "vae" and vae["figures"]["steps"] >= 1
    for key in ("v_iou", "s_iou", "v_iou_baseline", "s_iou_baseline", "decode_ms"):
        assert key in vae["figures"], key
    rows = {r["row"]: r for r in decode["figures"]["rows"]}
    assert list(rows) == ["dense", "+ hierarchical", "+ efficient decoder", "+ adaptive KV selection"]
    assert rows["+ hierarchical"]["queries"] <= rows["dense"]["queries"]
    assert rows["+ adaptive KV selection"]["attention_gflops"] < rows["+ efficient decoder"]["attention_gflops"]
