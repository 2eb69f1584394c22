"""The schedules file: good files load, and every problem of a bad one is named with its line and entry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from producer.errors import ScheduleFileError
from producer.schedule_file import load_schedules
from producer.triggers import CronTrigger, EveryTrigger

GOOD = """\
schedules:
  - name: nightly
    cron: "0 2 * * *"
    timezone: Europe/Paris
    job_file: jobs/nightly.jsonl
    output: s3://bucket/scheduled
    priority: 3
  - name: heartbeat
    every: 30s
    jobs:
      - {prompt: "a red fox", adapter: styles/ink}
      - prompt: a blue bird
        scale: 0.5
        priority: 9
    output: /data/out
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "jobs").mkdir()
    lines = [{"prompt": "a cat", "seed": 7}, {"prompt": "a dog", "adapter": "styles/ink"}]
    (tmp_path / "jobs" / "nightly.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "adapters" / "styles" / "ink").mkdir(parents=True)
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "schedules.yaml"
    path.write_text(text)
    return path


def problems_of(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ScheduleFileError) as e:
        load_schedules(path, **kwargs)
    assert all(p in str(e.value) for p in e.value.problems)  # the message shows them all
    return e.value.problems


def test_a_good_file_gives_each_run_its_own_dataset_and_job_ids(files: Path) -> None:
    nightly, heartbeat = load_schedules(write(files, GOOD), adapter_roots=[str(files / "adapters")])
    assert nightly.trigger == CronTrigger("0 2 * * *", "Europe/Paris")
    assert heartbeat.trigger == EveryTrigger(30)
    assert (nightly.job_source, heartbeat.job_source) == ("jobs/nightly.jsonl", "inline")

    monday, tuesday = datetime(2026, 11, 30, 1, tzinfo=UTC), datetime(2026, 12, 1, 1, tzinfo=UTC)
    assert nightly.dataset(monday) == "nightly-20261130T0100Z"
    jobs = nightly.jobs(monday)
    assert [job.prompt for job in jobs] == ["a cat", "a dog"]
    assert all(job.dataset == "nightly-20261130T0100Z" for job in jobs)
    assert all(job.output == "s3://bucket/scheduled" and job.priority == 3 for job in jobs)
    assert jobs[0].seed == 7  # a seed given in the file is kept in every run
    # The same run twice is the same jobs; the next run is other jobs.
    assert [job.job_id for job in nightly.jobs(monday)] == [job.job_id for job in jobs]
    assert not {job.job_id for job in nightly.jobs(tuesday)} & {job.job_id for job in jobs}

    fox, bird = heartbeat.jobs(datetime(2026, 11, 29, 13, 0, 30, tzinfo=UTC))
    assert fox.dataset == "heartbeat-20261129T130030Z"
    assert (fox.adapter, fox.priority, bird.scale, bird.priority) == ("styles/ink", 5, 0.5, 9)


def test_every_problem_is_reported_at_once_with_its_line_and_schedule(files: Path) -> None:
    path = write(
        files,
        """\
schedules:
  - name: nightly
    cron: "0 25 * * *"
    timezone: Europe/Pariss
    job_file: missing.jsonl
    output: /data/out
  - name: heartbeat
    every: 5x
    jobs:
      - {prompt: "a red fox", adapter: styles/nope}
      - prompt: a bird
        scale: 9
    output: ftp://somewhere
    colour: red
  - name: heartbeat
    cron: "* * * * *"
    jobs: [{prompt: "x", dataset: mine}]
    output: /data/out
""",
    )
    problems = problems_of(path, adapter_roots=[str(files / "adapters")])
    expected = [
        (4, "'nightly'", "unknown time zone 'Europe/Pariss'"),
        (3, "'nightly'", "bad cron expression '0 25 * * *': Bad hour"),
        (5, "'nightly'", "job_file missing.jsonl: cannot read"),
        (14, "'heartbeat'", "unknown field 'colour'"),
        (8, "'heartbeat'", "bad interval '5x'"),
        (13, "'heartbeat'", "output = 'ftp://somewhere': unsupported output URI scheme 'ftp'"),
        (11, "'heartbeat'", "jobs[1]: scale = 9"),
        (9, "'heartbeat'", "unknown adapter 'styles/nope': not found under the adapter roots"),
        (17, "'heartbeat'", "a job sets dataset 'mine'"),
        (15, "'heartbeat'", "the name is used on line 7 too"),
    ]
    assert len(problems) == len(expected)
    for (line, name, reason), problem in zip(expected, problems, strict=True):
        assert problem.startswith(f"{path}:{line}: schedule {name}: ") or problem.startswith(
            f"{path}:{line}: "
        ), problem
        assert reason in problem, problem


def test_a_bad_line_of_a_job_file_is_named_in_the_job_file_and_the_schedule(files: Path) -> None:
    (files / "jobs" / "nightly.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "x", "sacle": 2}\n')
    problems = problems_of(write(files, GOOD))
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{files / 'schedules.yaml'}:5: schedule 'nightly': job_file jobs/nightly.jsonl: line 2: sacle"
    )


def test_an_unknown_adapter_in_a_job_file_is_refused_when_roots_are_given(files: Path) -> None:
    (files / "jobs" / "nightly.jsonl").write_text('{"prompt": "x", "adapter": "styles/gone"}\n')
    problems = problems_of(write(files, GOOD), adapter_roots=[str(files / "adapters")])
    assert problems == [
        f"{files / 'schedules.yaml'}:5: schedule 'nightly': unknown adapter 'styles/gone': "
        f"not found under the adapter roots ({files / 'adapters'})"
    ]
    # Without roots the producer cannot know which adapters exist: the name's form is all it checks.
    assert len(load_schedules(files / "schedules.yaml")) == 2


def test_an_adapter_named_by_its_weights_file_is_known_as_the_worker_knows_it(files: Path) -> None:
    (files / "adapters" / "loose").mkdir()
    (files / "adapters" / "loose" / "ink.safetensors").write_bytes(b"")
    (files / "jobs" / "nightly.jsonl").write_text('{"prompt": "x", "adapter": "loose/ink.safetensors"}\n')
    assert len(load_schedules(write(files, GOOD), adapter_roots=[str(files / "adapters")])) == 2


def test_an_adapter_may_not_escape_its_root_through_a_link(
    files: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (files / "adapters" / "escape").symlink_to(outside)
    (files / "jobs" / "nightly.jsonl").write_text('{"prompt": "x", "adapter": "escape"}\n')
    (problem,) = problems_of(write(files, GOOD), adapter_roots=[str(files / "adapters")])
    assert "unknown adapter 'escape': resolves outside the adapter root" in problem


def test_a_missing_adapter_root_is_refused(files: Path) -> None:
    (problem,) = problems_of(write(files, GOOD), adapter_roots=[str(files / "nowhere")])
    assert problem.endswith(f"adapter root {files / 'nowhere'}: not a directory")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "must be a mapping with a 'schedules:' list"),
        ("schedules: []\n", ":1: 'schedules' holds no schedule"),
        (
            "schedules:\n  - name: a\n    name: b\n",
            ":3: not valid YAML: key 'name' appears twice (first on line 2)",
        ),
        ("schedules:\n  - cron: * * * * *\n", ":2: not valid YAML"),
        (
            "schedules: [{name: a, every: 5s, jobs: [{prompt: x}], output: /o}]\nextra: 1\n",
            ":2: unknown top-level key 'extra'",
        ),
        ("schedules: [{name: a, jobs: [{prompt: x}], output: /o}]\n", "give exactly one of 'cron'"),
        (
            "schedules: [{name: a, every: 5s, cron: '* * * * *', jobs: [{prompt: x}], output: /o}]\n",
            "exactly one of 'cron'",
        ),
        (
            "schedules: [{name: a, every: 5s, timezone: UTC, jobs: [{prompt: x}], output: /o}]\n",
            "'timezone' applies to 'cron' only",
        ),
        (
            "schedules: [{name: a, every: 5s, job_file: j.jsonl, jobs: [{prompt: x}], output: /o}]\n",
            "exactly one of 'job_file'",
        ),
        ("schedules: [{name: a, every: 5s, jobs: [{prompt: x}]}]\n", "'output' is required"),
        ("schedules: [{name: a, every: 5s, jobs: [], output: /o}]\n", "'jobs' must be a non-empty list"),
        ("schedules: [{name: a, every: 5s, jobs: [x], output: /o}]\n", "jobs[0]: a job must be a mapping"),
        (
            "schedules: [{name: a, every: 5s, jobs: [{prompt: 2026-01-01}], output: /o}]\n",
            "jobs[0]: not plain JSON",
        ),
        (
            "schedules: [{name: a, every: 5s, jobs: [{prompt: x}], output: /o, priority: 10}]\n",
            "priority = 10",
        ),
        (
            "schedules: [{name: a b, every: 5s, jobs: [{prompt: x}], output: /o}]\n",
            "name 'a b' cannot start a dataset name",
        ),
        (
            "schedules: [{name: " + "n" * 120 + ", every: 5s, jobs: [{prompt: x}], output: /o}]\n",
            "must be 1..128 characters",
        ),
        ("schedules: [{every: 5s, jobs: [{prompt: x}], output: /o}]\n", "schedule #1: 'name' is required"),
        ("schedules: [{name: a, every: 5s, jobs: [{prompt: x, job_id: j}], output: /o}]\n", "sets job_id"),
    ],
)
def test_a_bad_file_is_refused_saying_why(files: Path, text: str, reason: str) -> None:
    problems = problems_of(write(files, text))
    assert any(reason in problem for problem in problems), problems


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match=r"cannot read the schedules file .*missing\.yaml"):
        load_schedules(tmp_path / "missing.yaml")


def test_the_example_schedules_file_loads() -> None:
    example = Path(__file__).parents[2] / "examples" / "schedules.yaml"
    nightly, probe = load_schedules(example)
    assert nightly.trigger == CronTrigger("0 2 * * *", "Europe/Paris") and len(nightly.templates) == 5
    assert probe.trigger == EveryTrigger(15 * 60) and len(probe.templates) == 2
    assert nightly.dataset(datetime(2026, 11, 30, 1, tzinfo=UTC)) == "nightly-examples-20261130T0100Z"
