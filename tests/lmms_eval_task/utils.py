"""Document functions of the local lmms-eval task `llava_trim_shapes` (JSON lines: image path, question, answer)."""

from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + SHORT


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
