"""Prompt-table text metrics against hand-written answers and independent implementations (sacrebleu, rouge-score)."""
import pytest

from tests.data_fixtures import demo_root  # noqa: F401  (session fixture)

from eval import prompts

PREDICTIONS = [
    "a red apple on a wooden table",
    "two cats sleeping on a sofa",
    "a man in a black coat looking through a camera",
    "",
    "the sky is blue, with white clouds!",
    "a vintage film camera on a tripod",
]
REFERENCES = [
    "a red apple on a plate",
    "a tabby cat sleeping on a red sofa",
    "a man in a black coat looking through a camera",
    "a tall metal tripod",
    "blue sky with white clouds",
    "a vintage film camera",
]


@pytest.mark.parametrize("prediction, root, hit", [
    ("two cats on a sofa", "cat", 1),         # singular root inside a plural word
    ("a cat on a sofa", "cats", 0),           # plural root, singular prediction
    ("a small category of items", "cat", 1),  # plain substring, not a word match (the original's rule)
    ("a flag", "Flag", 0),                    # case-sensitive
    ("a cat, sleeping.", "cat", 1),           # punctuation around the word
    ("a bird", "cat", 0),
    ("", "cat", 0),                           # empty prediction
])
def test_accuracy_rule(prediction, root, hit):
  assert prompts.accuracy_hits([prediction], [root]) == [hit]


def test_predictions_are_lowercased_before_the_rule(tmp_path, demo_root):
  """A capitalised prediction counts after the command's lower-casing (the original lower-cased the answer)."""
  from eval.common import write_json
  path = tmp_path / "preds.json"
  write_json(path, {"skimage_camera": [{"mask": "mask_1", "prediction": "A Vintage CAMERA."}]})
  result = prompts.run(prompts.parse_args(["--predictions", str(path), "--dataset", demo_root, "--out",
                                           str(tmp_path / "out"), "--metrics", "accuracy"]))
  assert result["metrics"]["accuracy"] == 1.0


@pytest.mark.parametrize("n", [1, 4])
def test_bleu_is_corpus_level_like_sacrebleu(n):
  sacrebleu = pytest.importorskip("sacrebleu")
  ours = prompts.bleu(PREDICTIONS, REFERENCES, n)
  # torchmetrics' BLEUScore (the original's) splits on whitespace: sacrebleu's "none" tokenizer does the same
  score = lambda tok: sacrebleu.metrics.BLEU(max_ngram_order=n, tokenize=tok, smooth_method="none").corpus_score(
      PREDICTIONS, [REFERENCES]).score / 100  # noqa: E731
  assert 0 < ours < 1
  assert ours == pytest.approx(score("none"), abs=1e-6)
  assert abs(ours - score("13a")) > 1e-3  # 13a would split "clouds!" and "blue," (it is SacreBLEUScore's)
  # corpus-level, not a mean of sentence BLEUs
  sentence_mean = sum(prompts.bleu([p], [r], n) for p, r in zip(PREDICTIONS, REFERENCES)) / len(PREDICTIONS)
  assert abs(ours - sentence_mean) > 1e-3


def test_rouge_l_is_mean_f_measure_like_rouge_score():
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  want = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / len(PREDICTIONS)
  assert prompts.rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(want, abs=1e-6)


def test_prediction_layouts(tmp_path):
  from eval.common import write_json
  write_json(tmp_path / "a.json", {"s1": [{"mask": "mask_1", "prediction": "x", "colour": "red"},
                                          {"mask": "mask_0", "prediction": None}]})
  assert prompts.load_pairs(str(tmp_path / "a.json")) == {"s1": [("mask_1", "x"), ("mask_0", "")]}
  folder = tmp_path / "per_stem"
  write_json(folder / "s1.json", ["y", "z"])
  write_json(tmp_path / "manifest.json", {"s1": {"masks": ["mask_2", "mask_0"], "captions": ["p", "q"]}})
  assert prompts.load_pairs(str(folder), str(tmp_path / "manifest.json")) == {"s1": [("mask_2", "y"), ("mask_0", "z")]}
  with pytest.raises(ValueError, match="--manifest"):
    prompts.load_pairs(str(folder))
  write_json(tmp_path / "short.json", {"s1": ["mask_2"]})
  with pytest.raises(ValueError, match="manifest lists"):
    prompts.load_pairs(str(folder), str(tmp_path / "short.json"))
