"""Reads a server's ``/metrics`` (Prometheus text) into something easy to query."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Samples keyed by (sample name, sorted label pairs)."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        values = [value for (sample, pairs), value in self.samples.items()
                  if sample == name and set(labels.items()) <= set(pairs)]
        return sum(values) if values else default

    def has(self, name: str) -> bool:
        return any(sample == name for sample, _ in self.samples)

    def names(self, prefix: str = "") -> list[str]:
        return sorted({sample for sample, _ in self.samples if sample.startswith(prefix)})


def parse(text: str) -> Metrics:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            metrics.samples[key] = float(sample.value)
    return metrics


def scrape(base_url: str, timeout_s: float = 30.0) -> Metrics:
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as resp:
        return parse(resp.read().decode())
