"""The search space: Hydra's sweep syntax (``hydra.sweeper.params`` and the command line) as Optuna distributions.

``choice(a, b)`` is categorical; ``range(start, stop, step)`` the same values (``stop`` excluded,
as Hydra has it; ``shuffle(range(...))`` categorical); ``interval(low, high)`` uniform over floats
(Hydra parses its ends as floats), ``tag(log, interval(...))`` log-uniform. Any other override is
fixed: passed to every trial as written.
"""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from resnet_cifar.errors import ConfigError


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override."""
    values = None if override.is_interval_sweep() else list(override.sweep_iterator(transformer=Transformer.encode))
    if override.is_choice_sweep() or (override.is_range_sweep() and override.value().shuffle):
        return CategoricalDistribution(values)
    if override.is_range_sweep():
        step = override.value().step
        if all(isinstance(v, int) for v in (*values, step)):
            return IntDistribution(values[0], values[-1], step=step)
        return FloatDistribution(values[0], values[-1], step=step)
    interval = override.value()
    assert isinstance(interval, IntervalSweep)
    return FloatDistribution(interval.start, interval.end, log="log" in interval.tags)


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """``(name -> distribution, the fixed overrides)``; a key given twice keeps its last value."""
    parsed = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        parsed.pop(o.get_key_element(), None)  # a later one (the command line) replaces it, in its place
        parsed[o.get_key_element()] = o
    space, fixed = {}, []
    for name, o in parsed.items():
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        try:
            space[name] = distribution(o)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{o.input_line}: not a search range Optuna takes ({e})") from None
    return space, fixed
