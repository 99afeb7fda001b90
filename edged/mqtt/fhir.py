"""FHIR R4 vitals (contract v1.1): an `Observation` or a `Bundle` of them -> `Vitals`.

Gateways that speak FHIR publish vital-signs Observations on the vitals topic instead of the
native summary; this module turns them into the same `Vitals`, checked against the same
plausible ranges (`messages.VITAL_RANGES`), so scoring and alerts cannot tell the two apart.
Like `messages`, it is pure and raises only `ProtocolError`.

Rules this module adds where the contract is silent (each is documented at its check):
- `field` names a Bundle entry's resource by the entry (`entry.2.valueQuantity`, not
  `entry.2.resource.valueQuantity`), a blood pressure component by its index
  (`entry.0.component.1.valueQuantity`); a bare Observation drops the `entry.N.` prefix;
- Observations with status `entered-in-error` or `cancelled`, Bundle entries that are not
  Observations, and unknown codes are skipped without further checks;
- an Observation without `valueQuantity` (FHIR's `dataAbsentReason` instead) gives no value;
- `ts` is the latest effective time of the Observations read (any code: an unknown code's value
  is ignored, not its time), `window_s` their span (clamped into 1..3600, None when 0);
- a Quantity with a `comparator` (`<`, `>=`, …) is `invalid_schema`: a vital needs a value;
- °F is converted to °C and rounded to 0.01 °C before the range check; UCUM annotations in
  braces (`{beats}/min`) are dropped before the unit is compared;
- several readings of one vital make its min/mean/max, one reading a plain value.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from edged.domain import Vitals, VitalStat
from edged.mqtt.errors import ErrorCode, ProtocolError, json_type, show_value
from edged.mqtt.messages import (
    _RFC3339_RE,
    VITAL_RANGES,
    WINDOW_S_RANGE,
    _is_number,
    _not_one_of,
    _require_object,
    _schema,
    _timestamp,
    _wrong_type,
)

RESOURCE_TYPES = ("Observation", "Bundle")
MAX_BUNDLE_ENTRIES = 64
"""A gateway's Bundle of one summary window; the 16 KiB message limit usually binds first."""
SKIPPED_STATUSES = ("entered-in-error", "cancelled")
"""FHIR R4 ObservationStatus: these are not valid measurements, so they carry no value."""
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
BP_PANEL = "85354-9"
"""The blood pressure panel: its values are in `component`, not in `valueQuantity`."""
DEG_F = "[degF]"


@dataclass(frozen=True)
class LoincVital:
    vital: str
    """The `Vitals` field (and `VITAL_RANGES` key) the code fills."""
    label: str
    """Named in error messages next to the code."""
    units: tuple[str, ...]
    """The UCUM codes accepted; `[degF]` is converted to `Cel`."""


# FHIR R4 vital signs profile (hl7.org/fhir/R4/observation-vitalsigns.html), its table of LOINC
# codes and UCUM units. Systolic and diastolic are components of the panel, and also accepted
# as Observations of their own.
LOINC_VITALS: Mapping[str, LoincVital] = {
    "8867-4": LoincVital("heart_rate", "heart rate", ("/min",)),
    "9279-1": LoincVital("resp_rate", "respiratory rate", ("/min",)),
    "2708-6": LoincVital("spo2", "oxygen saturation", ("%",)),
    "59408-5": LoincVital("spo2", "oxygen saturation by pulse oximetry", ("%",)),
    "8310-5": LoincVital("temp_c", "body temperature", ("Cel", DEG_F)),
    "8480-6": LoincVital("systolic_bp", "systolic blood pressure", ("mm[Hg]",)),
    "8462-4": LoincVital("diastolic_bp", "diastolic blood pressure", ("mm[Hg]",)),
}
_KNOWN_CODES = frozenset((*LOINC_VITALS, BP_PANEL))
_EFFECTIVE = ("effectiveDateTime", "effectiveInstant")
# UCUM section 2.5: an annotation in braces (`{beats}/min`, `%{saturation}`) does not change
# the unit, so it is dropped before the code is compared.
_UCUM_ANNOTATION_RE = re.compile(r"\{[^{}]*\}")


@dataclass
class _Readings:
    """What the Observations of one message add up to, in the order read."""

    values: dict[str, list[float]] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    first: str | None = None
    """The path prefix of the first Observation read (`entry.0.` or ``): missing-time errors."""


def parse_fhir_vitals(obj: dict[str, Any], *, now: float | None = None) -> Vitals:
    """A FHIR R4 `Observation` or `Bundle` as a validated vitals summary.

    `now` (UNIX seconds, default: the clock) bounds the effective times as it bounds `ts`.
    Raises ProtocolError. `invalid_schema`: a `resourceType` other than Observation or Bundle,
    more than `MAX_BUNDLE_ENTRIES` entries, wrong types, a known code with a wrong UCUM unit or
    a non-numeric value, an unreadable effective time, none at all. `out_of_range`: a known
    code's value outside `VITAL_RANGES` (after °F -> °C), an effective time before 2000 or
    more than a day after `now`.
    """
    _require_object(obj)
    clock = time.time() if now is None else now
    kind = obj.get("resourceType")
    if kind == "Observation":
        observations = [(obj, "")]
    elif kind == "Bundle":
        observations = _bundle_observations(obj)
    else:
        _not_one_of("resourceType", kind, RESOURCE_TYPES)
    readings = _Readings()
    for resource, prefix in observations:
        _read_observation(resource, prefix, clock, readings)
    return _summary(readings, bundle=kind == "Bundle")


def _bundle_observations(bundle: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
    entries = bundle.get("entry")
    if entries is None:
        return []
    if type(entries) is not list:
        _wrong_type("entry", "an array", entries)
    if len(entries) > MAX_BUNDLE_ENTRIES:
        _schema(f"entry has {len(entries)} items; the limit is {MAX_BUNDLE_ENTRIES}", "entry")
    observations = []
    for index, entry in enumerate(entries):
        if type(entry) is not dict:
            _wrong_type(f"entry.{index}", "an object", entry)
        resource = entry.get("resource")
        # Bundles may mix in Patient, Device, Provenance…: only Observations carry vitals.
        if type(resource) is dict and resource.get("resourceType") == "Observation":
            observations.append((resource, f"entry.{index}."))
    return observations


def _read_observation(
    resource: Mapping[str, Any], prefix: str, now: float, readings: _Readings
) -> None:
    if resource.get("status") in SKIPPED_STATUSES:
        return
    if readings.first is None:
        readings.first = prefix
    seconds = _effective_seconds(resource, prefix, now)
    if seconds is not None:
        readings.times.append(seconds)
    code = _known_code(resource.get("code"), f"{prefix}code")
    if code is None:
        return
    if code == BP_PANEL:
        _read_components(resource.get("component"), prefix, readings)
    else:
        _read_quantity(code, resource.get("valueQuantity"), f"{prefix}valueQuantity", readings)


def _effective_seconds(resource: Mapping[str, Any], prefix: str, now: float) -> float | None:
    for key in _EFFECTIVE:
        value = resource.get(key)
        if value is None:
            continue
        path = prefix + key
        if type(value) is not str:
            _wrong_type(path, "a FHIR dateTime string", value)
        # FHIR dateTime also allows a bare date or year; a vital needs the moment, with offset.
        if _RFC3339_RE.fullmatch(value) is None:
            _schema(
                f"{path} = {show_value(value)} needs a date, a time and an offset "
                "(e.g. 2025-11-25T10:00:00Z)",
                path,
            )
        return _timestamp(value, now, path)
    return None


def _known_code(code: Any, path: str) -> str | None:
    """The first LOINC coding of `code` this module reads, else None (the code is skipped)."""
    if code is None:
        return None
    if type(code) is not dict:
        _wrong_type(path, "a CodeableConcept object", code)
    coding = code.get("coding")
    if coding is None:
        return None
    if type(coding) is not list:
        _wrong_type(f"{path}.coding", "an array", coding)
    for item in coding:
        if type(item) is dict and item.get("system") == LOINC:
            value = item.get("code")
            if type(value) is str and value in _KNOWN_CODES:
                return value
    return None


def _read_components(components: Any, prefix: str, readings: _Readings) -> None:
    if components is None:
        return
    if type(components) is not list:
        _wrong_type(f"{prefix}component", "an array", components)
    for index, component in enumerate(components):
        path = f"{prefix}component.{index}"
        if type(component) is not dict:
            _wrong_type(path, "an object", component)
        # Any known code counts: some cuffs add the pulse (8867-4) as a component of the panel.
        code = _known_code(component.get("code"), f"{path}.code")
        if code is not None and code != BP_PANEL:
            quantity = component.get("valueQuantity")
            _read_quantity(code, quantity, f"{path}.valueQuantity", readings)


def _read_quantity(code: str, quantity: Any, path: str, readings: _Readings) -> None:
    if quantity is None:
        return
    spec = LOINC_VITALS[code]
    what = f"{path}: {code} ({spec.label})"
    if type(quantity) is not dict:
        _schema(f"{what} must be a Quantity object, got {json_type(quantity)}", path)
    value: Any = quantity.get("value")
    if not _is_number(value):
        _schema(f"{what} value must be a number, got {json_type(value)}", path)
    if quantity.get("comparator") is not None:
        comparator = show_value(quantity["comparator"])
        _schema(f"{what} has comparator {comparator}; a vital needs an exact value", path)
    # UCUM's `code` is the unit; `unit` is only its display string ("beats/minute").
    system, sent = quantity.get("system"), quantity.get("code")
    if system is not None and system != UCUM:
        _schema(f"{what} unit system {show_value(system)} is not {UCUM}", path)
    unit = _ucum_unit(sent)
    if unit not in spec.units:
        allowed = " or ".join(spec.units)
        shown = "missing" if sent is None else show_value(sent)
        _schema(f"{what} UCUM code is {shown}; it must be {allowed}", path)
    native = _celsius(value) if unit == DEG_F else value
    lo, hi = VITAL_RANGES[spec.vital]
    # Compared before float(): an int with hundreds of digits would overflow float().
    if not lo <= native <= hi:
        converted = f" ({native:g} Cel)" if unit == DEG_F else ""
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE,
            f"{what} = {show_value(value)} {sent}{converted} is outside {lo}..{hi}",
            path,
        )
    readings.values.setdefault(spec.vital, []).append(float(native))


def _ucum_unit(code: Any) -> Any:
    return _UCUM_ANNOTATION_RE.sub("", code) if type(code) is str and "{" in code else code


def _celsius(fahrenheit: float) -> float:
    # Clamped first: a JSON integer with hundreds of digits overflows float(), and anything
    # this far out fails the range check either way.
    bounded = min(max(fahrenheit, -1e6), 1e6)
    return round((bounded - 32) * 5 / 9, 2)


def _summary(readings: _Readings, *, bundle: bool) -> Vitals:
    if not readings.times:
        # Like a native summary without `ts`: no moment to put the readings at.
        _no_time(readings.first, bundle)
    latest, span = max(readings.times), max(readings.times) - min(readings.times)
    lo, hi = WINDOW_S_RANGE
    window_s = float(min(max(span, lo), hi)) if span > 0 else None
    stats: dict[str, Any] = {vital: _stat(values) for vital, values in readings.values.items()}
    return replace(Vitals(ts=latest, window_s=window_s), **stats)


def _no_time(first: str | None, bundle: bool) -> NoReturn:
    if first is None:
        where = "entry" if bundle else "status"
        _schema(
            "no Observation to read (entered-in-error and cancelled ones are skipped), "
            "so no time for ts",
            where,
        )
    path = f"{first}effectiveDateTime"
    _schema(f"{path} is required: no Observation has effectiveDateTime or effectiveInstant", path)


def _stat(values: list[float]) -> VitalStat:
    """One reading is a plain value (like a bare number); several, their min, mean and max."""
    if len(values) == 1:
        return VitalStat(values[0])
    low, high = min(values), max(values)
    # Clamped: a rounded mean of equal values can land one ulp outside them (0.1 * 3 / 3).
    return VitalStat(min(max(math.fsum(values) / len(values), low), high), low, high)
