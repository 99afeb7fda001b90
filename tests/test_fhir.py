"""FHIR R4 vitals in (contract v1.1): Observations and Bundles become the native `Vitals`.

The Observations are shaped like the FHIR R4 vital-signs profile examples
(hl7.org/fhir/R4/observation-example-heart-rate, -respiratory-rate, -bodytemp, -satO2,
-bloodpressure): `meta.profile`, `category` vital-signs, `subject`, a LOINC `code`, and a
`valueQuantity` with `unit`, `system` and UCUM `code`. Only the times differ: the examples use
bare dates, which carry no moment to score.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from edged.domain import Vitals, VitalStat
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.fhir import MAX_BUNDLE_ENTRIES, parse_fhir_vitals
from edged.mqtt.messages import parse_vitals
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from tests._mqtt import TestClient, mosquitto_pub

NOW = 1764064800.0
"""2025-11-25T10:00:00Z, the `ts` of the API.md example."""
P = "edged/v1"
UCUM = "http://unitsofmeasure.org"
VITAL_SIGNS = [
    {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs",
            }
        ],
        "text": "Vital Signs",
    }
]


def _at(seconds: float) -> str:
    """An R4 dateTime with an offset, as a gateway in Central Europe would write it."""
    moment = datetime.fromtimestamp(seconds, timezone(timedelta(hours=1)))
    return moment.isoformat(timespec="seconds")


def _loinc(*codes: tuple[str, str]) -> dict[str, Any]:
    coding = [{"system": "http://loinc.org", "code": code, "display": d} for code, d in codes]
    return {"coding": coding, "text": codes[0][1]}


def _quantity(value: Any, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def observation(id: str, code: dict[str, Any], at: float = NOW, **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id,
        "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]},
        "status": "final",
        "category": VITAL_SIGNS,
        "code": code,
        "subject": {"reference": "Patient/example"},
        "effectiveDateTime": _at(at),
        **value,
    }


def heart_rate(value: Any = 44, at: float = NOW) -> dict[str, Any]:
    return observation(
        "heart-rate",
        _loinc(("8867-4", "Heart rate")),
        at,
        valueQuantity=_quantity(value, "beats/minute", "/min"),
    )


def resp_rate(value: Any = 26, at: float = NOW) -> dict[str, Any]:
    return observation(
        "respiratory-rate",
        _loinc(("9279-1", "Respiratory rate")),
        at,
        valueQuantity=_quantity(value, "breaths/minute", "/min"),
    )


def body_temp(value: Any = 36.5, unit: str = "Cel", at: float = NOW) -> dict[str, Any]:
    shown = {"Cel": "C", "[degF]": "F"}.get(unit, unit)
    return observation(
        "body-temperature",
        _loinc(("8310-5", "Body temperature")),
        at,
        valueQuantity=_quantity(value, shown, unit),
    )


def sat_o2(value: Any = 95, at: float = NOW) -> dict[str, Any]:
    # The satO2 example carries both LOINC codes, and an ISO/IEEE 11073 one that is not LOINC.
    code = _loinc(
        ("2708-6", "Oxygen saturation in Arterial blood"),
        ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
    )
    code["coding"].append(
        {"system": "urn:iso:std:iso:11073:10101", "code": "150456", "display": "MDC_PULS_OXIM"}
    )
    return observation("satO2", code, at, valueQuantity=_quantity(value, "%", "%"))


def blood_pressure(systolic: Any = 107, diastolic: Any = 60, at: float = NOW) -> dict[str, Any]:
    def component(code: str, display: str, value: Any) -> dict[str, Any]:
        return {
            "code": _loinc((code, display)),
            "valueQuantity": _quantity(value, "mmHg", "mm[Hg]"),
        }

    return observation(
        "blood-pressure",
        _loinc(("85354-9", "Blood pressure panel with all children optional")),
        at,
        component=[
            component("8480-6", "Systolic blood pressure", systolic),
            component("8462-4", "Diastolic blood pressure", diastolic),
        ],
    )


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{index}", "resource": resource}
            for index, resource in enumerate(resources)
        ],
    }


def _refused(obj: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_fhir_vitals(obj, now=NOW)
    return caught.value


# -- the profile's examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "field", "expected"),
    [
        (heart_rate(), "heart_rate", VitalStat(44.0)),
        (resp_rate(), "resp_rate", VitalStat(26.0)),
        (body_temp(), "temp_c", VitalStat(36.5)),
        (sat_o2(), "spo2", VitalStat(95.0)),
        (blood_pressure(), "systolic_bp", VitalStat(107.0)),
        (blood_pressure(), "diastolic_bp", VitalStat(60.0)),
    ],
)
def test_each_vital_signs_example_is_read_as_its_native_vital(
    resource: dict[str, Any], field: str, expected: VitalStat
) -> None:
    vitals = parse_fhir_vitals(resource, now=NOW)
    assert getattr(vitals, field) == expected
    assert vitals.ts == NOW and vitals.window_s is None


def test_a_bundle_is_the_same_vitals_as_the_equivalent_native_summary() -> None:
    fhir = bundle(
        heart_rate(120, at=NOW - 120),
        heart_rate(128, at=NOW - 60),
        heart_rate(135, at=NOW),
        resp_rate(26, at=NOW - 30),
        body_temp(101.12, "[degF]", at=NOW - 30),
        sat_o2(85, at=NOW - 30),
        blood_pressure(95, 60, at=NOW - 30),
    )
    native = {
        "ts": NOW,
        "window_s": 120,
        "heart_rate": {"mean": 127.66666666666667, "min": 120, "max": 135},
        "resp_rate": 26,
        "temp_c": 38.4,
        "spo2": 85,
        "systolic_bp": 95,
        "diastolic_bp": 60,
    }
    assert parse_fhir_vitals(fhir, now=NOW) == parse_vitals(native, now=NOW)


def test_repeated_heart_rates_make_min_mean_max_over_the_span_of_their_times() -> None:
    rates = (72, 88, 104, 96)
    fhir = bundle(*(heart_rate(rate, at=NOW - 90 + 30 * i) for i, rate in enumerate(rates)))
    vitals = parse_fhir_vitals(fhir, now=NOW)
    assert vitals.heart_rate == VitalStat(mean=90.0, min=72.0, max=104.0)
    assert (vitals.ts, vitals.window_s) == (NOW, 90.0)


def test_the_mean_of_equal_readings_stays_between_min_and_max() -> None:
    # fsum(25.1 * 3) / 3 is 25.100000000000005: a mean above the max breaks min <= mean <= max.
    vitals = parse_fhir_vitals(bundle(*[body_temp(25.1)] * 3), now=NOW)
    assert vitals.temp_c == VitalStat(mean=25.1, min=25.1, max=25.1)


def test_both_spo2_codes_pool_into_one_vital() -> None:
    pulse_ox = sat_o2(93)
    pulse_ox["code"]["coding"] = pulse_ox["code"]["coding"][1:]  # 59408-5 alone
    vitals = parse_fhir_vitals(bundle(sat_o2(97), pulse_ox), now=NOW)
    assert vitals.spo2 == VitalStat(mean=95.0, min=93.0, max=97.0)


def test_effective_instant_and_offsets_give_the_same_ts() -> None:
    instant = heart_rate()
    del instant["effectiveDateTime"]
    instant["effectiveInstant"] = "2025-11-25T10:00:00.000Z"
    assert parse_fhir_vitals(instant, now=NOW).ts == NOW
    assert heart_rate()["effectiveDateTime"] == "2025-11-25T11:00:00+01:00"


@pytest.mark.parametrize(
    ("earliest", "window_s"),
    [("2025-11-25T09:59:59.6Z", 1.0), ("2025-11-25T08:00:00Z", 3600.0)],
)
def test_window_is_clamped_into_the_native_range(earliest: str, window_s: float) -> None:
    early = heart_rate(70)
    early["effectiveDateTime"] = earliest
    vitals = parse_fhir_vitals(bundle(early, heart_rate(80)), now=NOW)
    assert (vitals.ts, vitals.window_s) == (NOW, window_s)


# -- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fahrenheit", "celsius"), [(98.6, 37.0), (100.4, 38.0), (95, 35.0)])
def test_fahrenheit_is_converted_to_celsius(fahrenheit: float, celsius: float) -> None:
    assert parse_fhir_vitals(body_temp(fahrenheit, "[degF]"), now=NOW).temp_c == VitalStat(celsius)


def test_fahrenheit_out_of_range_names_both_units() -> None:
    err = _refused(bundle(heart_rate(), body_temp(120, "[degF]")))
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "entry.1.valueQuantity")
    assert err.message == (
        "entry.1.valueQuantity: 8310-5 (body temperature) = 120 [degF] (48.89 Cel) "
        "is outside 25..45"
    )


@pytest.mark.parametrize(
    ("quantity", "said"),
    [
        (
            {"value": 44, "unit": "beats/minute", "system": UCUM, "code": "beats/min"},
            "UCUM code is 'beats/min'; it must be /min",
        ),
        ({"value": 44, "unit": "/min"}, "UCUM code is missing; it must be /min"),
        (
            {"value": 44, "system": "http://snomed.info/sct", "code": "/min"},
            "unit system 'http://snomed.info/sct' is not http://unitsofmeasure.org",
        ),
        ({"value": "44", "system": UCUM, "code": "/min"}, "value must be a number, got string"),
        (
            {"value": 300, "comparator": ">", "system": UCUM, "code": "/min"},
            "has comparator '>'; a vital needs an exact value",
        ),
    ],
)
def test_a_wrong_unit_or_value_type_is_invalid_schema_naming_the_entry(
    quantity: dict[str, Any], said: str
) -> None:
    wrong = heart_rate()
    wrong["valueQuantity"] = quantity
    err = _refused(bundle(resp_rate(), sat_o2(), wrong))
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "entry.2.valueQuantity")
    assert err.message == f"entry.2.valueQuantity: 8867-4 (heart rate) {said}"


def test_ucum_annotations_do_not_change_the_unit() -> None:
    annotated = heart_rate()
    annotated["valueQuantity"]["code"] = "{beats}/min"
    saturation = sat_o2(93)
    saturation["valueQuantity"]["code"] = "%{saturation}"
    warm = body_temp(100.4, "[degF]{oral}")
    vitals = parse_fhir_vitals(bundle(annotated, saturation, warm), now=NOW)
    assert (vitals.heart_rate, vitals.spo2) == (VitalStat(44.0), VitalStat(93.0))
    assert vitals.temp_c == VitalStat(38.0)
    beats_only = heart_rate()
    beats_only["valueQuantity"]["code"] = "{beats}"  # an annotation alone is UCUM's 1
    assert _refused(beats_only).field == "valueQuantity"


def test_the_unit_display_string_is_not_the_unit() -> None:
    # `unit` is free text for people; only the UCUM `code` decides.
    odd = heart_rate()
    odd["valueQuantity"]["unit"] = "bpm (device display)"
    assert parse_fhir_vitals(odd, now=NOW).heart_rate == VitalStat(44.0)


# -- implausible values ---------------------------------------------------------------------


def test_an_implausible_value_is_out_of_range_naming_entry_code_and_value() -> None:
    err = _refused(bundle(resp_rate(), sat_o2(), heart_rate(400)))
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "entry.2.valueQuantity")
    assert err.message == "entry.2.valueQuantity: 8867-4 (heart rate) = 400 /min is outside 20..300"


def test_a_bare_observation_names_value_quantity_without_entry() -> None:
    err = _refused(sat_o2(130))
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "valueQuantity")
    assert "2708-6" in err.message and "130" in err.message and "50..100" in err.message


def test_a_blood_pressure_component_is_named_by_its_index() -> None:
    err = _refused(bundle(heart_rate(), blood_pressure(120, 15)))
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "entry.1.component.1.valueQuantity")
    assert "8462-4 (diastolic blood pressure) = 15 mm[Hg] is outside 20..200" in err.message
    bare = _refused(blood_pressure(400, 60))
    assert bare.field == "component.0.valueQuantity" and "8480-6" in bare.message


def test_a_huge_integer_is_out_of_range_not_a_crash() -> None:
    err = _refused(body_temp(10**400, "[degF]"))
    assert err.code == ErrorCode.OUT_OF_RANGE and "digits" in err.message


# -- what is skipped ------------------------------------------------------------------------


def test_an_unknown_code_is_ignored_whatever_its_value() -> None:
    weight = observation(
        "body-weight",
        _loinc(("29463-7", "Body weight")),
        valueQuantity={"value": "heavy", "unit": "lb", "system": UCUM, "code": "[lb_av]"},
    )
    vitals = parse_fhir_vitals(bundle(weight, heart_rate(70)), now=NOW)
    assert vitals == Vitals(ts=NOW, heart_rate=VitalStat(70.0))


def test_only_unknown_codes_is_a_summary_with_no_vitals_like_a_native_ts() -> None:
    weight = observation(
        "body-weight",
        _loinc(("29463-7", "Body weight")),
        valueQuantity=_quantity(185, "lb", "[lb_av]"),
    )
    assert parse_fhir_vitals(bundle(weight), now=NOW) == parse_vitals({"ts": NOW}, now=NOW)


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_retracted_observations_are_skipped(status: str) -> None:
    retracted = heart_rate(400)
    retracted["status"] = status
    vitals = parse_fhir_vitals(bundle(retracted, heart_rate(70)), now=NOW)
    assert vitals.heart_rate == VitalStat(70.0)


def test_entries_that_are_not_observations_are_skipped() -> None:
    patient = {"resourceType": "Patient", "id": "example", "birthDate": "1974-12-25"}
    fhir = bundle(patient, heart_rate(70))
    fhir["entry"].append({"fullUrl": "urn:uuid:x", "request": {"method": "DELETE"}})
    assert parse_fhir_vitals(fhir, now=NOW).heart_rate == VitalStat(70.0)


def test_an_observation_without_a_value_gives_none() -> None:
    absent = heart_rate()
    del absent["valueQuantity"]
    absent["dataAbsentReason"] = {"text": "sensor off the wrist"}
    assert parse_fhir_vitals(bundle(absent, resp_rate(14)), now=NOW).heart_rate is None


# -- whole-message errors -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Patient", "observation", 7, None])
def test_another_resource_type_is_refused_naming_the_allowed_ones(kind: Any) -> None:
    err = _refused({"resourceType": kind})
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "resourceType")
    assert "Observation, Bundle" in err.message


def test_bundle_entries_are_capped() -> None:
    err = _refused(bundle(*[heart_rate(70)] * (MAX_BUNDLE_ENTRIES + 1)))
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "entry")
    assert f"{MAX_BUNDLE_ENTRIES + 1} items; the limit is {MAX_BUNDLE_ENTRIES}" in err.message
    assert parse_fhir_vitals(bundle(*[heart_rate(70)] * MAX_BUNDLE_ENTRIES), now=NOW)


def test_no_effective_time_anywhere_is_invalid_schema_naming_the_field() -> None:
    untimed = [heart_rate(), sat_o2()]
    for resource in untimed:
        del resource["effectiveDateTime"]
    err = _refused(bundle(*untimed))
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "entry.0.effectiveDateTime")
    timed = parse_fhir_vitals(bundle(*untimed, resp_rate(at=NOW - 5)), now=NOW)
    assert timed.ts == NOW - 5 and timed.heart_rate == VitalStat(44.0)


@pytest.mark.parametrize(
    ("when", "code"),
    [
        ("1999-07-02", ErrorCode.INVALID_SCHEMA),  # the examples' bare date: no moment
        ("2025-11-25T10:00:00", ErrorCode.INVALID_SCHEMA),  # no offset
        ("1999-07-02T10:00:00Z", ErrorCode.OUT_OF_RANGE),
        ("2025-11-27T10:00:00Z", ErrorCode.OUT_OF_RANGE),  # two days ahead of the clock
    ],
)
def test_unusable_effective_times_are_refused(when: str, code: ErrorCode) -> None:
    late = resp_rate()
    late["effectiveDateTime"] = when
    err = _refused(bundle(heart_rate(), late))
    assert (err.code, err.field) == (code, "entry.1.effectiveDateTime")


def test_structure_errors_name_the_path() -> None:
    assert _refused({"resourceType": "Bundle", "entry": {}}).field == "entry"
    assert _refused({"resourceType": "Bundle", "entry": ["x"]}).field == "entry.0"
    bad_code = heart_rate()
    bad_code["code"] = {"coding": "8867-4"}
    assert _refused(bundle(bad_code)).field == "entry.0.code.coding"


def test_the_parsed_bundle_does_not_change_the_input() -> None:
    fhir = bundle(heart_rate(70), blood_pressure())
    before = copy.deepcopy(fhir)
    parse_fhir_vitals(fhir, now=NOW)
    assert fhir == before


# -- in the daemon, against a real broker ---------------------------------------------------


def test_a_fhir_bundle_raises_the_same_alert_as_the_native_summary(
    broker: PrivateBroker, daemon: Daemon, gateway: TestClient
) -> None:
    now = float(int(time.time()))
    fhir = bundle(
        heart_rate(120, at=now - 60),
        heart_rate(135, at=now),
        resp_rate(26, at=now),
        sat_o2(85, at=now),
        body_temp(101.12, "[degF]", at=now),
        blood_pressure(95, 60, at=now),
    )
    native = {
        "ts": now,
        "window_s": 60,
        "heart_rate": {"mean": 127.5, "min": 120, "max": 135},
        "resp_rate": 26,
        "spo2": 85,
        "temp_c": 38.4,
        "systolic_bp": 95,
        "diastolic_bp": 60,
    }
    # mosquitto_pub: a third-party gateway's client, not ours.
    mosquitto_pub(broker.port, f"{P}/w-fhir/vitals", fhir)
    mosquitto_pub(broker.port, f"{P}/w-native/vitals", native)
    from_fhir = gateway.wait_for(lambda r: r.topic == f"{P}/w-fhir/alert", timeout=10).json()
    from_native = gateway.wait_for(lambda r: r.topic == f"{P}/w-native/alert", timeout=10).json()
    assert from_fhir["severity"] == "high" and from_fhir["news2"]["score"] >= 7
    assert "spo2_low" in from_fhir["red_flags"]
    for key in ("ts", "severity", "news2", "red_flags", "message"):
        assert from_fhir[key] == from_native[key], key
    assert daemon.metrics().counters.vitals == 2


def test_a_bad_fhir_message_gets_an_error_naming_the_entry(
    daemon: Daemon, gateway: TestClient
) -> None:
    now = time.time()
    patient = {"resourceType": "Patient", "id": "example"}
    gateway.publish(
        f"{P}/w1/vitals", bundle(patient, heart_rate(72, at=now), heart_rate(400, at=now))
    )
    err = gateway.wait_for(lambda r: r.topic == f"{P}/w1/error", timeout=10).json()
    assert err == {
        "id": None,
        "code": "out_of_range",
        "message": "entry.2.valueQuantity: 8867-4 (heart rate) = 400 /min is outside 20..300",
        "field": "entry.2.valueQuantity",
        "retry_after_ms": None,
    }
    gateway.publish(f"{P}/w1/vitals", {"resourceType": "Patient", "id": "example"})
    err = gateway.wait_for(lambda r: r.topic == f"{P}/w1/error", timeout=10).json()
    assert (err["code"], err["field"]) == ("invalid_schema", "resourceType")
    gateway.publish(f"{P}/w1/vitals", heart_rate(72, at=now))  # a bare Observation is fine
    assert not [r for r in gateway.drain(1.0) if r.topic.endswith("/error")]
    assert daemon.metrics().counters.vitals == 1
