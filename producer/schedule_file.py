"""The schedules file: recurring datasets, read whole and validated before beat sends anything.

```yaml
schedules:
  - name: nightly-styles          # each run is the dataset nightly-styles-<UTC time>, e.g. ...-20261129T0100Z
    cron: "0 2 * * *"             # five fields, quoted (a YAML value may not start with '*')
    timezone: Europe/Paris        # IANA name; default UTC
    job_file: nightly.jsonl       # JSONL, relative to this file; or `jobs:` with a list of jobs
    output: s3://bucket/scheduled
    priority: 3                   # optional: the default for jobs that lack one
  - name: heartbeat
    every: 30s                    # instead of cron: s, m, h or d, aligned to the Unix epoch (UTC)
    jobs:
      - {prompt: "a red fox", adapter: styles/ink}
    output: /data/out
```

A run's jobs are its templates (the job file's lines or the `jobs` list) with the run's dataset
set, so their derived ids differ from run to run and repeat exactly when one run is sent twice. A
template may not set `dataset` or `job_id`. Every problem in the file is reported at once, each with the
file's line and the schedule it belongs to; the job files are read once, when the file is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from producer.adapter_roots import root_problems, unknown_adapter_reason
from producer.errors import JobFileError, JobValidationError, ScheduleFileError
from producer.jobfile import MAX_PROBLEMS_SHOWN, read_job_file
from producer.layout import name_problem
from producer.schema import Job, validate_job
from producer.triggers import DEFAULT_TIMEZONE, CronTrigger, EveryTrigger, Trigger, time_zone

TOP_LEVEL_KEY = "schedules"
ENTRY_FIELDS = ("name", "cron", "timezone", "every", "job_file", "jobs", "output", "priority")
_SAMPLE_TIME = datetime.fromisoformat("2000-01-01T00:00:00+00:00")


@dataclass(frozen=True)
class Schedule:
    """One recurring dataset: when it fires, and the jobs of each run (without their dataset)."""

    name: str
    trigger: Trigger
    templates: tuple[dict[str, Any], ...]
    output: str
    priority: int | None
    job_source: str  # the job file as written, or "inline"

    def dataset(self, scheduled_at: datetime) -> str:
        """The schedule's name and the run's scheduled time, e.g. `nightly-20261129T0100Z`."""
        return f"{self.name}-{self.trigger.stamp(scheduled_at)}"

    def jobs(self, scheduled_at: datetime) -> list[Job]:
        """The run's jobs; they validated at load time with a dataset name as long as this one."""
        dataset = self.dataset(scheduled_at)
        return [validate_job({**template, "dataset": dataset}) for template in self.templates]


class _Mapping(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int
    key_lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus line numbers and a refusal of repeated keys (YAML keeps the last)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    data = _Mapping()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in data.key_lines:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (first on line {data.key_lines[key]})",
                key_node.start_mark,
            )
        data.key_lines[key] = key_node.start_mark.line + 1
        data[key] = loader.construct_object(value_node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 ({e.reason})"
        raise ScheduleFileError(f"cannot read the schedules file {path}: {reason or e}") from e
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only, no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(e, "problem", None) or str(e)
        problem = f"{where}: not valid YAML: {reason}"
        raise ScheduleFileError(problem, [problem]) from e


class _Entry:
    """Checks one entry, collecting every problem with its line instead of stopping at the first."""

    def __init__(self, path: Path, raw: _Mapping, index: int, roots: Sequence[str]) -> None:
        self.path = path
        self.raw = raw
        self.roots = roots
        self.label = f"schedule {raw['name']!r}" if isinstance(raw.get("name"), str) else f"schedule #{index}"
        self.problems: list[str] = []

    def _where(self, key: str | None = None) -> str:
        return f"{self.path}:{self.raw.key_lines.get(key, self.raw.line)}: {self.label}"

    def problem(self, reason: str, key: str | None = None) -> None:
        self.problems.append(f"{self._where(key)}: {reason}")

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.problem(f"'{key}' is required", key)
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(f"'{key}' must be a non-empty string, not {value!r}", key)
            return None
        return value

    def check(self) -> Schedule | None:
        for key in self.raw:
            if key not in ENTRY_FIELDS:
                self.problem(f"unknown field {key!r}; the fields are: {', '.join(ENTRY_FIELDS)}", key)
        name = self.text("name", required=True)
        trigger = self._trigger()
        defaults = self._defaults()
        sample = None
        if name is not None and trigger is not None:
            sample = f"{name}-{trigger.stamp(_SAMPLE_TIME)}"
            if (reason := name_problem(sample)) is not None:
                self.problem(f"name {name!r} cannot start a dataset name like {sample!r}: {reason}", "name")
                sample = None
        templates = self._templates(defaults, sample or "sample-20000101T0000Z")
        if self.problems or name is None or trigger is None or templates is None:
            return None
        return Schedule(
            name=name,
            trigger=trigger,
            templates=tuple(templates),
            output=defaults["output"],  # required: a missing or bad output is a problem above
            priority=defaults.get("priority"),
            job_source=self.raw.get("job_file", "inline"),
        )

    def _trigger(self) -> Trigger | None:
        has_cron, has_every = "cron" in self.raw, "every" in self.raw
        if has_cron == has_every:
            self.problem("give exactly one of 'cron' (an expression) or 'every' (an interval such as 30s)")
            return None
        if has_every and "timezone" in self.raw:
            self.problem("'timezone' applies to 'cron' only ('every' counts from the Unix epoch)", "timezone")
        key = "cron" if has_cron else "every"
        value = self.text(key)
        zone = self.text("timezone") if has_cron and "timezone" in self.raw else DEFAULT_TIMEZONE
        if zone is not None and zone != DEFAULT_TIMEZONE:
            try:
                time_zone(zone)
            except ValueError as e:
                self.problem(str(e), "timezone")
                zone = None
        if value is None:
            return None
        try:
            # A bad zone was reported above; the expression is still checked (in UTC).
            trigger = CronTrigger(value, zone or DEFAULT_TIMEZONE) if has_cron else EveryTrigger.parse(value)
        except ValueError as e:
            self.problem(str(e), key)
            return None
        return trigger if zone is not None else None

    def _defaults(self) -> dict[str, Any]:
        """`output` and `priority`, the defaults of the run's jobs, checked once as a job checks them.

        Only the good ones are returned, so the jobs are still checked when one of them is bad.
        """
        given = {"output": self.text("output", required=True)}
        if "priority" in self.raw:
            given["priority"] = self.raw["priority"]
        defaults = {}
        for key, value in given.items():
            try:
                validate_job({"prompt": "-", key: value})
            except JobValidationError as e:
                self.problems.extend(f"{self._where(key)}: {problem}" for problem in e.problems)
                continue
            if value is not None:
                defaults[key] = value
        return defaults

    def _templates(self, defaults: dict[str, Any], sample: str) -> list[dict[str, Any]] | None:
        has_file, has_list = "job_file" in self.raw, "jobs" in self.raw
        if has_file == has_list:
            self.problem("give exactly one of 'job_file' (a JSONL file) or 'jobs' (a list of jobs)")
            return None
        with_dataset = {**defaults, "dataset": sample}
        key = "job_file" if has_file else "jobs"
        jobs = self._file_jobs(with_dataset) if has_file else self._inline_jobs(with_dataset)
        for dataset in sorted({job.dataset for job in jobs} - {sample}):
            self.problem(f"a job sets dataset {dataset!r}: each run's dataset is named by the schedule", key)
        for job_id in sorted(job.job_id for job in jobs if "job_id" in job.model_fields_set):
            # One id in every run would make a worker settle one run's job with another's.
            self.problem(f"a job sets job_id {job_id!r}: a scheduled job's id is derived in each run", key)
        self._check_adapters(jobs, key)
        # The fields given (not the derived job_id and seed), less the dataset each run sets.
        return [
            {k: v for k, v in job.model_dump(mode="json", exclude_unset=True).items() if k != "dataset"}
            for job in jobs
        ]

    def _file_jobs(self, defaults: dict[str, Any]) -> list[Job]:
        written = self.text("job_file")
        if written is None:
            return []
        job_path = self.path.parent / written
        try:
            return read_job_file(str(job_path), defaults, action="scheduled").jobs
        except JobFileError as e:
            for problem in e.problems or [str(e)]:
                self.problem(f"job_file {written}: {problem}", "job_file")
            return []

    def _inline_jobs(self, defaults: dict[str, Any]) -> list[Job]:
        """The good jobs of the list; each bad one is a problem with its line."""
        items = self.raw["jobs"]
        if not isinstance(items, list) or not items:
            self.problem("'jobs' must be a non-empty list of jobs", "jobs")
            return []
        jobs = []
        for i, item in enumerate(items):
            line = item.line if isinstance(item, _Mapping) else self.raw.key_lines["jobs"]
            try:
                if not isinstance(item, dict):
                    raise JobValidationError([f"a job must be a mapping, not {type(item).__name__}"])
                try:
                    plain = json.loads(json.dumps(item, allow_nan=False))
                except (TypeError, ValueError) as e:
                    raise JobValidationError([f"not plain JSON values ({e})"]) from e
                jobs.append(validate_job({**defaults, **plain}))
            except JobValidationError as e:
                self.problems.extend(f"{self.path}:{line}: {self.label}: jobs[{i}]: {p}" for p in e.problems)
        return jobs

    def _check_adapters(self, jobs: list[Job], key: str) -> None:
        for adapter in sorted({job.adapter for job in jobs if job.adapter is not None}):
            reason = unknown_adapter_reason(adapter, self.roots)
            if reason is not None:
                self.problem(f"unknown adapter {adapter!r}: {reason}", key)


def load_schedules(path: str | Path, *, adapter_roots: Sequence[str] = ()) -> list[Schedule]:
    """Every schedule of the file, or ScheduleFileError listing every problem (file:line: schedule: reason).

    With `adapter_roots`, each job's adapter must resolve under them as the worker resolves it;
    without roots only the adapter name's form is checked (the worker's roots decide at run time).
    """
    path = Path(path)
    data = _read_yaml(path)
    problems = [f"{path}: {p}" for p in root_problems(adapter_roots)]
    if not isinstance(data, _Mapping) or not isinstance(data.get(TOP_LEVEL_KEY), list):
        problems.append(f"{path}: the file must be a mapping with a '{TOP_LEVEL_KEY}:' list of schedules")
    else:
        for key in data:
            if key != TOP_LEVEL_KEY:
                problems.append(f"{path}:{data.key_lines[key]}: unknown top-level key {key!r}")
        if not data[TOP_LEVEL_KEY]:
            problems.append(f"{path}:{data.key_lines[TOP_LEVEL_KEY]}: '{TOP_LEVEL_KEY}' holds no schedule")
    schedules: list[Schedule] = []
    if not problems:
        first_line: dict[str, int] = {}
        for index, raw in enumerate(data[TOP_LEVEL_KEY], start=1):
            if not isinstance(raw, _Mapping):
                problems.append(f"{path}:{data.key_lines[TOP_LEVEL_KEY]}: schedule #{index} is not a mapping")
                continue
            entry = _Entry(path, raw, index, adapter_roots)
            schedule = entry.check()
            problems.extend(entry.problems)
            name = raw.get("name")
            if isinstance(name, str) and first_line.setdefault(name, raw.line) != raw.line:
                problems.append(
                    f"{path}:{raw.line}: schedule {name!r}: the name is used on line {first_line[name]} too"
                )
            if schedule is not None:
                schedules.append(schedule)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise ScheduleFileError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown), problems)
    return schedules
