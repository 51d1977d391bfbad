"""Field checks shared by the readers: query text and ID, document references and their JSON paths.

Each returns the value and the problems as ``(field, what, fix)`` triples, so a reader can name the file
and line itself.
"""

from __future__ import annotations

from typing import Any

from embedtune.data.corpus import _type_name

__all__ = ["dict_flags", "doc_refs", "query_id", "query_text", "ref_path"]


def query_id(
    obj: dict[str, Any], keys: tuple[str, ...]
) -> tuple[str | None, str | None, tuple[str, str, str] | None]:
    """(id, field it came from, problem) for an optional query ID field."""
    for key in keys:
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
                return (
                    None,
                    key,
                    (key, f"expected a non-empty string, got {_type_name(v)}", f'write "{key}" as a string'),
                )
            return str(v), key, None
    return None, None, None


def query_text(
    obj: dict[str, Any], where: str = "", preferred: str = "query"
) -> tuple[str | None, tuple[str, str, str] | None]:
    key = "query" if "query" in obj else "question"
    v = obj.get(key)
    if v is None:
        other = "question" if preferred == "query" else "query"
        return None, (f"{where}{preferred}", "missing", f'add the query text as "{preferred}" (or "{other}")')
    if not isinstance(v, str):
        return None, (
            f"{where}{key}",
            f"expected a string, got {_type_name(v)}",
            f'write "{key}" as a string',
        )
    if not v.strip():
        return None, (f"{where}{key}", "empty string", "give the query text, or delete the example")
    return v, None


def doc_refs(value: Any, where: str, required: bool) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Document IDs of a corpus-ID ``pos_doc``/``neg_doc`` list, and problems (field, what, fix).

    When there is no problem, entry ``k`` of the result is entry ``k`` of the list (see :func:`ref_path`).
    """
    if value is None:
        return [], (
            [(where, "missing", f'add "{where.rsplit(".", 1)[-1]}": [{{"id": "<document id>"}}]')]
            if required
            else []
        )
    if not isinstance(value, list):
        return [], [
            (
                where,
                f"expected a list, got {_type_name(value)}",
                'write a list such as [{"id": "d1"}, {"id": "d2"}]',
            )
        ]
    if not value and required:
        return [], [(where, "empty list", "give at least one positive document id")]
    ids: list[str] = []
    problems: list[tuple[str, str, str]] = []
    for k, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("id")
            if item is None:
                problems.append(
                    (
                        ref_path(where, value, k),
                        "missing",
                        'give each entry an "id" that names a corpus document',
                    )
                )
                continue
        if isinstance(item, bool) or not isinstance(item, (str, int)) or str(item) == "":
            problems.append(
                (
                    ref_path(where, value, k),
                    f"expected a document id string, got {_type_name(item)}",
                    'write {"id": "<document id>"}',
                )
            )
        else:
            ids.append(item if isinstance(item, str) else str(item))
    return ids, problems


def ref_path(where: str, value: list[Any] | bool | tuple[bool, ...], k: int) -> str:
    """JSON path of entry ``k`` of a doc list: ``data[3].pos_doc[0].id`` or ``data[3].neg_doc[1]``.

    ``value`` is the list itself or its :func:`dict_flags`.
    """
    if isinstance(value, list):
        value = dict_flags(value)
    is_dict = value if isinstance(value, bool) else value[k]
    return f"{where}[{k}].id" if is_dict else f"{where}[{k}]"


def dict_flags(value: Any) -> bool | tuple[bool, ...]:
    """Which entries of a doc list are ``{"id": ...}`` objects: one bool when all agree (the usual case)."""
    flags = tuple(isinstance(x, dict) for x in value) if isinstance(value, list) else ()
    if all(flags):
        return True
    if not any(flags):
        return False
    return flags
