"""A miniature of LLaVA's `playground/data/eval` (eval.zip plus each benchmark's images and ground truth), in the
exact upstream layout: file names, field names, TSV columns. Two questions or so per benchmark."""

import base64
import io
import json
from pathlib import Path

from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
MMBENCH_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def picture(path: Path | None = None, colour=(200, 40, 40), size=(64, 48)) -> bytes:
    image = Image.new("RGB", size, colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if path is None or path.suffix == ".png" else "JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def mmbench_rows(chinese: bool = False) -> list[dict]:
    image = base64.b64encode(picture(colour=(30, 90, 200))).decode()
    question = "图中是什么颜色？" if chinese else "What colour is the picture?"
    return [
        {
            "index": "0",
            "question": question,
            "hint": "nan",
            "A": "red",
            "B": "blue",
            "C": "",
            "D": "",
            "answer": "B",
            "category": "attribute_recognition",
            "image": image,
            "source": "MMBench",
            "l2-category": "Attribute Reasoning",
            "comment": "nan",
            "split": "dev",
        },
        {
            "index": "7",
            "question": "Which one is a fruit?",
            "hint": "Look carefully.",
            "A": "apple",
            "B": "car",
            "C": "NA",  # pandas reads "NA" as missing: the options stop here
            "D": "boat",
            "answer": "A",
            "category": "object_localization",
            "image": image,
            "source": "MMBench",
            "l2-category": "Fine-grained Perception",
            "comment": "",
            "split": "dev",
        },
    ]


def write_tsv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(MMBENCH_COLUMNS)] + ["\t".join(row[column] for column in MMBENCH_COLUMNS) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_llava_eval(root: Path) -> Path:
    """Write the miniature under `root` (the data root, like `playground/data/eval`) and return `root`."""
    # VQAv2: test-dev questions, the whole test2015 split for the submission
    vqav2 = [
        {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg", "text": "Is it red?" + SHORT},
        {"question_id": 262144001, "image": "COCO_test2015_000000262144.jpg", "text": "How many?" + SHORT},
    ]
    write_jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", vqav2)
    write_jsonl(
        root / "vqav2/llava_vqav2_mscoco_test2015.jsonl",
        vqav2 + [{"question_id": 1, "image": "COCO_test2015_000000000001.jpg", "text": "Why?" + SHORT}],
    )
    picture(root / "vqav2/test2015/COCO_test2015_000000262144.jpg")

    # GQA
    write_jsonl(
        root / "gqa/llava_gqa_testdev_balanced.jsonl",
        [
            {"question_id": "20968379", "image": "n288870.jpg", "text": "Do the shorts have dark color?" + SHORT},
            {"question_id": "20968380", "image": "n288870.jpg", "text": "What is on the table?" + SHORT},
        ],
    )
    write_json(
        root / "gqa/data/testdev_balanced_questions.json",
        {
            "20968379": {"answer": "yes", "isBalanced": True, "imageId": "n288870"},
            "20968380": {"answer": "cup", "isBalanced": True, "imageId": "n288870"},
        },
    )
    picture(root / "gqa/data/images/n288870.jpg")

    # VizWiz
    write_jsonl(
        root / "vizwiz/llava_test.jsonl",
        [
            {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?" + UNANSWERABLE + SHORT},
            {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What colour?" + UNANSWERABLE + SHORT},
        ],
    )
    picture(root / "vizwiz/test/VizWiz_test_00000000.jpg")
    picture(root / "vizwiz/test/VizWiz_test_00000001.jpg", colour=(10, 200, 10))

    # ScienceQA: one question with an image, one text-only
    write_json(
        root / "scienceqa/llava_test_CQM-A.json",
        [
            {
                "id": "5",
                "image": "5/image.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nContext: A red block.\nWhich colour?\nA. red\nB. blue"},
                    {"from": "gpt", "value": "A"},
                ],
            },
            {
                "id": "9",
                "conversations": [
                    {"from": "human", "value": "Context: N/A\nWhich is a mammal?\nA. cat\nB. trout\nC. frog"},
                    {"from": "gpt", "value": "A"},
                ],
            },
        ],
    )
    write_json(
        root / "scienceqa/problems.json",
        {"5": {"choices": ["red", "blue"], "answer": 0}, "9": {"choices": ["cat", "trout", "frog"], "answer": 0}},
    )
    write_json(root / "scienceqa/pid_splits.json", {"test": ["5", "9"], "val": []})
    picture(root / "scienceqa/images/test/5/image.png")

    # TextVQA: question ids are image ids
    write_jsonl(
        root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
        [
            {
                "question_id": "003a8ae2ef43b901",
                "image": "003a8ae2ef43b901.jpg",
                "text": "what is the brand of this camera?\nReference OCR token: dakota, digital" + SHORT,
            },
            {"question_id": "0054c91397f2fe05", "image": "0054c91397f2fe05.jpg", "text": "what year is it?" + SHORT},
        ],
    )
    write_json(
        root / "textvqa/TextVQA_0.5.1_val.json",
        {
            "dataset_name": "textvqa",
            "data": [
                {
                    "image_id": "003a8ae2ef43b901",
                    "question": "what is the brand of this camera?",
                    "answers": ["dakota"] * 7 + ["Dakota Digital"] * 3,
                },
                {"image_id": "0054c91397f2fe05", "question": "What year is it?", "answers": ["2011"] * 10},
            ],
        },
    )
    picture(root / "textvqa/train_images/003a8ae2ef43b901.jpg")
    picture(root / "textvqa/train_images/0054c91397f2fe05.jpg")

    # POPE: per-split label files pair with answers by position
    pope = [
        ("adversarial", 1, "snowboard", "yes"),
        ("adversarial", 2, "dog", "no"),
        ("popular", 3, "car", "no"),
        ("random", 4, "cup", "yes"),
    ]
    write_jsonl(
        root / "pope/llava_pope_test.jsonl",
        [
            {
                "question_id": qid,
                "image": "COCO_val2014_000000310196.jpg",
                "text": f"Is there a {thing} in the image?" + SHORT,
                "category": split,
            }
            for split, qid, thing, _ in pope
        ],
    )
    for split in ("adversarial", "popular", "random"):
        write_jsonl(
            root / f"pope/coco/coco_pope_{split}.json",
            [
                {
                    "question_id": qid,
                    "image": "COCO_val2014_000000310196.jpg",
                    "text": f"Is there a {thing} in the image?",
                    "label": label,
                }
                for s, qid, thing, label in pope
                if s == split
            ],
        )
    picture(root / "pope/val2014/COCO_val2014_000000310196.jpg")

    # MME: two questions per image; a flat task folder (image and its question file side by side)
    release = root / "MME/MME_Benchmark_release_version"
    write_jsonl(
        root / "MME/llava_mme.jsonl",
        [
            {
                "question_id": "existence/000000006040.jpg",
                "image": "existence/000000006040.jpg",
                "text": "Is there a train in this image?" + SHORT,
                "category": "existence",
            },
            {
                "question_id": "existence/000000006040.jpg",
                "image": "existence/000000006040.jpg",
                "text": "Is there a bed in this image?" + SHORT,
                "category": "existence",
            },
        ],
    )
    picture(release / "existence/000000006040.jpg")
    (release / "existence/000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image?  Please answer yes or no.\tNo\n",  # two spaces, as in MME's files
        encoding="utf-8",
    )

    # MMBench and MMBench-CN: TSV with base64 images
    write_tsv(root / "mmbench/mmbench_dev_20230712.tsv", mmbench_rows())
    write_tsv(root / "mmbench_cn/mmbench_dev_cn_20231003.tsv", mmbench_rows(chinese=True))

    # SEED-Bench
    write_jsonl(
        root / "seed_bench/llava-seed-bench.jsonl",
        [
            {
                "image": "SEED-Bench-image/1454426_2591111986.jpg",
                "text": "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER,
                "category": "Instances Counting",
                "question_id": 101669,
            },
            {
                "image": "SEED-Bench-image/1454426_2591111986.jpg",
                "text": "What is the scene?\nA. Beach\nB. Kitchen\nC. Street\nD. Forest" + LETTER,
                "category": "Scene Understanding",
                "question_id": 101670,
            },
        ],
    )
    write_json(
        root / "seed_bench/SEED-Bench.json",
        {
            "question_type": {"Scene Understanding": 1, "Instances Counting": 5},
            "questions": [  # string ids, in another order than LLaVA's question file
                {"question_id": "101670", "answer": "B", "data_type": "image", "question_type_id": 1},
                {"question_id": "101669", "answer": "A", "data_type": "image", "question_type_id": 5},
            ],
        },
    )
    picture(root / "seed_bench/SEED-Bench-image/1454426_2591111986.jpg")

    # LLaVA-Bench (in the wild) and MM-Vet: free-form, GPT-judged
    write_jsonl(
        root / "llava-bench-in-the-wild/questions.jsonl",
        [{"question_id": 0, "image": "001.jpg", "text": "What is the name of this sight?", "category": "conv"}],
    )
    picture(root / "llava-bench-in-the-wild/images/001.jpg")
    write_jsonl(root / "mm-vet/llava-mm-vet.jsonl", [{"question_id": 0, "image": "v1_0.png", "text": "What is x?"}])
    picture(root / "mm-vet/images/v1_0.png")
    return root
