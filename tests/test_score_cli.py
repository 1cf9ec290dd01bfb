"""``dabon score``: output format, errors naming line and field, resume without duplicates."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from actors.chat import prompt_token_ids, response_token_ids
from actors.selection import argmin_index
from pipelines.cli import main
from tests.reference import naive_scores

ROWS = [
    {"id": "a", "prompt": "How do I bake bread?", "responses": ["Mix flour and water.", "", "I can't help."]},
    {"id": 2, "prompt": "Tell me a joke", "responses": ["Why did the chicken cross the road?", "No."]},
    {"id": "c", "prompt": "Hi", "responses": ["Hello! How can I help?"], "response_ids": [[28, 29, 30, 2]]},
    {"id": "d", "prompt": "Bye", "responses": ["Goodbye.", "See you.", "Later!"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def score_args(tiny_models, input_path, output_path, *extra):
    return ["score", "--base", tiny_models.base, "--adapter", tiny_models.adapter, "--input", str(input_path),
            "--output", str(output_path), "--layers", "2,4", "--no-progress", *extra]


def test_output_rows_match_the_slow_reference_and_select_the_argmin(tmp_path, tiny_models, smol_tokenizer):
    from transformers import LlamaForCausalLM

    write_jsonl(tmp_path / "in.jsonl", ROWS)
    code = main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                           "--metrics", "latent_sim,kl,perplexity,self_certainty", "--chunk-rows", "3"))
    assert code == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == ["a", 2, "c", "d"]

    base = LlamaForCausalLM.from_pretrained(tiny_models.base).eval()
    merged = LlamaForCausalLM.from_pretrained(tiny_models.merged).eval()
    for row, produced in zip(ROWS, out):
        responses = row.get("response_ids") or [response_token_ids(smol_tokenizer, r) for r in row["responses"]]
        expected = naive_scores(base, merged, prompt_token_ids(smol_tokenizer, row["prompt"]), responses, (2, 4))
        for layer in (2, 4):
            assert produced["latent_sim"][str(layer)] == pytest.approx(expected["latent_sim"][layer], abs=1e-6)
            assert produced["selected"][str(layer)] == argmin_index(produced["latent_sim"][str(layer)])
        for metric in ("kl", "perplexity", "self_certainty"):
            assert produced[metric] == pytest.approx(expected[metric], rel=1e-4, abs=1e-6)
    assert out[0]["kl"][1] is None and out[0]["perplexity"][1] is None  # the empty response


def test_metrics_not_asked_for_are_omitted(tmp_path, tiny_models):
    write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl")) == 0
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert set(row) == {"id", "latent_sim", "selected"}
    assert set(row["latent_sim"]) == {"2", "4"} and all(len(v) == 3 for v in row["latent_sim"].values())


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"id": "x", "responses": ["a"]}, "line 3: field 'prompt'"),
        ({"id": "x", "prompt": "p", "responses": "not a list"}, "line 3: field 'responses'"),
        ({"id": "x", "prompt": "p", "responses": ["ok", 7]}, r"line 3: field 'responses\[1\]'"),
        ({"prompt": "p", "responses": ["a"]}, "line 3: field 'id'"),
        ({"id": "a", "prompt": "p", "responses": ["a"]}, "line 3: field 'id' 'a' repeats"),
        ({"id": "x", "prompt": "p", "response_ids": [[1, "2"]]}, "line 3: field 'response_ids'"),
    ],
)
def test_a_malformed_row_stops_with_line_and_field_and_keeps_rows_before_it(tmp_path, tiny_models, capsys, bad_row, message):
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps(bad_row), json.dumps(ROWS[3])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    code = main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl"))
    assert code == 2

    assert re.search(message, capsys.readouterr().err)
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == ["a", 2]


def test_invalid_json_names_the_line(tmp_path, tiny_models, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl")) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_resume_completes_a_torn_output_without_duplicates(tmp_path, tiny_models, capsys):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "full.jsonl")) == 0
    full = read_jsonl(tmp_path / "full.jsonl")

    # an interrupted run: two complete rows and half of the third
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_text(lines[0] + lines[1] + lines[2][:25])
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl")) == 2
    assert "--resume" in capsys.readouterr().err  # refuses to clobber without being told

    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--resume")) == 0
    resumed = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in resumed] == ["a", 2, "c", "d"]
    for a, b in zip(resumed, full):
        assert a["selected"] == b["selected"]
        for layer in ("2", "4"):
            assert a["latent_sim"][layer] == pytest.approx(b["latent_sim"][layer], abs=1e-6)


def test_bad_flags_are_reported_without_a_traceback(tmp_path, tiny_models):
    write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True)
    result = run(*score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "o.jsonl")[:-3], "--layers", "2,99", "--no-progress")
    assert result.returncode == 2 and "layers: [99] out of range" in result.stderr and "Traceback" not in result.stderr
    result = run("score", "--adapter", tiny_models.adapter, "--input", str(tmp_path / "in.jsonl"), "--output", "o", "--layers", "six")
    assert result.returncode == 2 and "--layers: expected comma-separated integers" in result.stderr
    result = run("score", "--base", tiny_models.base, "--adapter", str(tmp_path / "nope"), "--input",
                 str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o2.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    help_text = run("score", "--help").stdout
    for option in ("--base", "--adapter", "--finetuned", "--input", "--output", "--layers", "--metrics", "--batch-tokens", "--resume"):
        assert option in help_text
