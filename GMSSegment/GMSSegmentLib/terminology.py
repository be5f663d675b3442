"""What a segment is, in codes: the card's ``terminology`` of each segment (SNOMED CT category and type, optionally a
type modifier such as laterality) as DICOM SEG writes it (dicomseg.py) and as Slicer's terminology entry string, which
the ``.seg.nrrd`` output and the Slicer import put on each segment (the ``TerminologyEntry`` tag), so that Slicer's
own DICOM export of the Segmentation node writes the same codes without the user choosing any.

Card format: ``"terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT",
"4147007", "Mass"]}`` (coding scheme designator, code value, code meaning; ``"modifier"`` optional). A segment without
one is SNOMED CT "Tissue" (Slicer's default too). No imports beyond the standard library.
"""
from __future__ import annotations

#: a segment without codes in its card: SNOMED CT "Tissue" for category and type (Slicer's default)
DEFAULT_CODES = {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}
#: the context names of Slicer's terminology entry (Modules/Loadable/Terminologies, the DICOM master lists)
SLICER_CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"


def is_code(value) -> bool:
    """[scheme, value, meaning]: three non-empty strings without Slicer's separators (``^``, ``~``, ``|``)."""
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, str) and v.strip() and not set(v) & set("^~|") for v in value))


def has_codes(segment) -> bool:
    """Whether the card gives the segment its own codes (category and type)."""
    return segment_codes(segment) is not DEFAULT_CODES


def segment_codes(segment) -> dict:
    """A card segment's (a ``Segment`` or its dict) codes: its ``terminology`` when it has category and type, else
    :data:`DEFAULT_CODES`."""
    if isinstance(segment, dict):
        entry = segment.get("terminology")
    else:
        entry = getattr(segment, "extra", {}).get("terminology")
    if isinstance(entry, dict) and is_code(entry.get("category")) and is_code(entry.get("type")):
        return entry
    return DEFAULT_CODES


def slicer_terminology(segment) -> str:
    """The segment's codes as Slicer's terminology entry: seven ``~``-separated parts of ``scheme^value^meaning``
    (context, category, type, type modifier, region context, region, region modifier; see Slicer's
    vtkSlicerTerminologiesModuleLogic.h)."""
    codes = segment_codes(segment)

    def code(c) -> str:
        return "^".join(c) if is_code(c) else "^^"
    return "~".join([SLICER_CATEGORY_CONTEXT, code(codes["category"]), code(codes["type"]),
                     code(codes.get("modifier")), SLICER_REGION_CONTEXT, "^^", "^^"])
