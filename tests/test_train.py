"""End-to-end on the tiny dataset: train -> evaluate -> search, resume, interruption."""

import csv
import json
import math
import os
import shutil
import statistics

import pytest
import torch
from tiny import train_argv

import encoder
import evaluate
import index
import retrieval
import search
import train
from checkpoint import load_model
from dataset import PairDataset, epoch_order, read_image
from model import DualEncoder


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run")
    argv = train_argv(tiny_data, model_dir, "--epochs", "12", "--lr", "5e-3", "--head_lr", "5e-3",
                      "--save_every", "5")
    assert train.main(argv) == 0
    return model_dir


def test_training_writes_checkpoints_logs_and_plot(trained):
    names = set(os.listdir(trained))
    assert {"best.pt", "last.pt", "checkpoint_epoch_5.pt", "checkpoint_epoch_10.pt", "metrics.jsonl",
            "training_curves.png", "tokenizer"} <= names
    history = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert history[-1]["loss"] < history[0]["loss"]
    best = torch.load(trained / "best.pt", weights_only=True)
    assert best["metrics"]["rsum"] == max(h["val"]["rsum"] for h in history)
    # best.pt is for inference (no AdamW moments); last.pt keeps what a resume needs.
    assert best["optimizer"] is None
    assert torch.load(trained / "last.pt", weights_only=True)["optimizer"]["state"]


def test_train_evaluate_search_beats_chance(trained, tmp_path, capsys):
    out = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(trained / "best.pt"), "--split", "test",
                          "--output_json", str(out), "--num_workers", "0", "--device", "cpu"]) == 0
    m = json.loads(out.read_text())
    assert m["n_images"] == 8 and m["n_queries"] == 40
    # Chance on 8 photos: R@1 12.5 %, mean rank 4.5. The level this run reaches, measured over seeds 42 and
    # 1-11 (2-core AMD EPYC, December 2026): best.pt's text->image R@1 50 and mean rank 1.5 for 9 seeds,
    # 50 and 1.625 for seed 42 (this run), 37.5 and 2.0 (seed 6) and 25 and 3.0 (seed 3: stuck); after 3 of
    # the 12 epochs, R@1 25-35 and mean rank 2.475-3.0 for every seed, after 6, mean rank 1.475-3.0.
    assert m["t2i"]["R@1"] >= 40.0 and m["t2i"]["mean_rank"] <= 1.8
    assert set(m["t2i"]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    assert m["querybank"] is False


    capsys.readouterr()
    assert search.main(["--checkpoint", str(trained / "best.pt"), "--query", "a red circle", "--top_k", "4",
                        "--output_dir", str(tmp_path), "--device", "cpu"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(("1 ", "2 "))]
    hits = [ln.split()[-1] for ln in lines]
    assert any("red" in os.path.basename(h) for h in hits), hits
    assert (tmp_path / "search_a_red_circle.png").stat().st_size > 10_000


def brute_force_querybank(checkpoint, split, size, flip, photo_bias=True):
    """evaluate.py --querybank's figures worked out here: embeddings of the split's and the train split's
    photos (at `size` pixels, with `flip`) and captions, each photo's bias the log of a sum over the train
    captions of exp(scale x similarity), over scale (each caption's, over the train photos), and every rank
    counted. photo_bias=False: the photos' biases left out (text->image ranked by cosine)."""
    m, tok, ck = load_model(checkpoint, torch.device("cpu"))
    data = ck["args"]["data_dir"]
    with open(os.path.join(data, "captions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    def embed(split):
        rs = [r for r in rows if r["split"] == split]
        photos = sorted({r["image"] for r in rs})
        with torch.no_grad():
            img = m.encode_images(torch.stack([read_image(os.path.join(data, "images", p), size) for p in photos]),
                                  flip)
            t = tok([r["caption"] for r in rs], padding="longest", return_tensors="pt")
            txt = m.encode_texts(t["input_ids"], t["attention_mask"])
        return img.double(), txt.double(), [photos.index(r["image"]) for r in rs]
    img, txt, caption_image = embed(split)
    bank_img, bank_txt, _ = embed("train")
    scale = m.logit_scale.exp().item()
    img_bias = [math.log(sum(math.exp(scale * float(b @ x)) for b in bank_txt)) / scale if photo_bias else 0.0
                for x in img]
    txt_bias = [math.log(sum(math.exp(scale * float(b @ q)) for b in bank_img)) / scale for q in txt]
    sims = (txt @ img.T).tolist()  # (Q, N)
    t2i = []
    for q, target in enumerate(caption_image):
        score = [sims[q][j] - img_bias[j] for j in range(len(img))]
        t2i.append(1 + sum(score[j] >= score[target] for j in range(len(img)) if j != target))
    i2t = []
    for i in range(len(img)):
        score = [sims[q][i] - txt_bias[q] for q in range(len(txt))]
        own = [q for q, j in enumerate(caption_image) if j == i]
        i2t.append(min(1 + sum(score[q2] >= score[q] for q2 in range(len(txt)) if q2 not in own) for q in own))

    def summary(ranks):  # the median of an even count: the lower middle one, as torch.median gives it
        return {**{f"R@{k}": 100 * sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)},
                "mean_rank": sum(ranks) / len(ranks), "median_rank": statistics.median_low(ranks)}
    return {"t2i": summary(t2i), "i2t": summary(i2t)}


def test_evaluate_querybank_figures_are_those_of_querybank_normalised_scores(trained, tmp_path):
    # The recipes' inference options (72 pixels, each photo averaged with its mirror image), and fp32 (as
    # --no_amp trains), so the embeddings here and evaluate.py's agree to 1e-6.
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["args"].update(eval_image_size=72, eval_flip=True, amp=False)
    (tmp_path / "m").mkdir()
    torch.save(ck, tmp_path / "m" / "best.pt")
    shutil.copytree(trained / "tokenizer", tmp_path / "m" / "tokenizer")
    out = tmp_path / "test.json"

    def evaluated(flag):
        assert evaluate.main(["--checkpoint", str(tmp_path / "m" / "best.pt"), "--split", "train", flag,
                              "--output_json", str(out), "--num_workers", "0", "--device", "cpu"]) == 0
        return json.loads(out.read_text())
    qb, plain = evaluated("--querybank"), evaluated("--no_querybank")
    assert (qb["querybank"], plain["querybank"]) == (True, False)
    # The train split: enough photos that leaving out either direction's biases changes its figures.
    want = brute_force_querybank(tmp_path / "m" / "best.pt", "train", 72, True)
    for d in ("t2i", "i2t"):
        assert qb[d] == pytest.approx(want[d], abs=1e-9), d
    assert qb["rsum"] == pytest.approx(sum(want[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    assert plain["i2t"] != want["i2t"]  # the normalisation changes the figures of both directions here
    assert brute_force_querybank(tmp_path / "m" / "best.pt", "train", 72, True, photo_bias=False)["t2i"] != want["t2i"]


def test_evaluate_overrides_the_inference_options_of_the_checkpoint(trained, tmp_path, monkeypatch):
    # A checkpoint as train.py --eval_image_size 72 --eval_flip saves it, beside the plain one (64 px, no flip).
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["args"].update(eval_image_size=72, eval_flip=True)
    os.makedirs(tmp_path / "m")
    torch.save(ck, tmp_path / "m" / "best.pt")
    shutil.copytree(trained / "tokenizer", tmp_path / "m" / "tokenizer")
    plain, recipe = str(trained / "best.pt"), str(tmp_path / "m" / "best.pt")
    seen, real = set(), DualEncoder.encode_images  # (photo side, flip) of the photo batches encoded
    monkeypatch.setattr(DualEncoder, "encode_images",
                        lambda m, images, flip=False: seen.add((images.shape[-1], flip)) or real(m, images, flip))

    def run(checkpoint, *flags):
        seen.clear()
        out = tmp_path / "val.json"
        assert evaluate.main(["--checkpoint", checkpoint, "--split", "val", "--output_json", str(out),
                              "--num_workers", "0", "--device", "cpu", *flags]) == 0
        return json.loads(out.read_text()), set(seen)

    as_trained, how = run(recipe)
    assert (as_trained["eval_image_size"], as_trained["eval_flip"], as_trained["querybank"]) == (72, True, False)
    assert how == {(72, True)}
    assert run(plain, "--eval_image_size", "72", "--eval_flip") == ({**as_trained, "checkpoint": plain}, how)
    default, how = run(plain)
    assert (default["eval_image_size"], default["eval_flip"]) == (64, False) and how == {(64, False)}
    assert run(recipe, "--eval_image_size", "64", "--no_eval_flip") == ({**default, "checkpoint": recipe}, how)


def test_search_index_is_reused_and_rebuilt(trained, tmp_path, monkeypatch):
    argv = ["--query", "green square", "--output_dir", str(tmp_path), "--device", "cpu", "--use_test_set",
            "--num_workers", "0", "--index_dir", str(tmp_path)]
    search.main(["--checkpoint", str(trained / "best.pt"), *argv])
    calls = []
    real = index.encode_image_files
    # a[1]: the paths to encode
    monkeypatch.setattr(index, "encode_image_files", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    search.main(["--checkpoint", str(trained / "best.pt"), *argv])
    assert calls == []  # same checkpoint, same photos: the stored index answers
    # A retrained checkpoint of the same name: other image weights, so all 8 photos are encoded again.
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["model"]["image_proj.bias"] += 0.01
    os.makedirs(tmp_path / "retrained")
    torch.save(ck, tmp_path / "retrained" / "best.pt")
    search.main(["--checkpoint", str(tmp_path / "retrained" / "best.pt"), *argv])
    assert calls == [8]


def test_inference_options_of_the_checkpoint_steer_evaluate_and_search(trained, tmp_path, capsys, monkeypatch):
    # The recipe's inference options, as train.py --eval_image_size 72 --eval_flip --querybank saves them.
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["args"].update(eval_image_size=72, eval_flip=True, querybank=True)
    os.makedirs(tmp_path / "m")
    torch.save(ck, tmp_path / "m" / "best.pt")
    shutil.copytree(trained / "tokenizer", tmp_path / "m" / "tokenizer")
    best = str(tmp_path / "m" / "best.pt")
    sizes = []
    real_split = retrieval.EvalSplit
    monkeypatch.setattr(retrieval, "EvalSplit", lambda d, split, size: sizes.append(size) or real_split(d, split, size))
    out = tmp_path / "val.json"
    common = ["--checkpoint", best, "--split", "val", "--output_json", str(out), "--num_workers", "0",
              "--device", "cpu"]
    assert evaluate.main(common) == 0
    assert json.loads(out.read_text())["querybank"] is True and sizes == [72, 72]  # val, then the photo bank
    assert evaluate.main([*common, "--no_querybank"]) == 0
    plain = json.loads(out.read_text())
    assert plain["querybank"] is False and sizes[-1] == 72

    # search.py ranks text queries by similarity less each photo's querybank bias (train captions).
    model, tok, _ = load_model(best, torch.device("cpu"))
    banks = []
    real_bank = retrieval.caption_bank
    monkeypatch.setattr(retrieval, "caption_bank", lambda *a: banks.append(1) or real_bank(*a))
    argv = ["--checkpoint", best, "--use_test_set", "--query", "a red circle", "--top_k", "8", "--json",
            "--device", "cpu", "--num_workers", "0"]
    capsys.readouterr()
    assert search.main(argv) == 0
    hits = json.loads(capsys.readouterr().out)
    ix = index.GalleryIndex.load(str(tmp_path / "m" / "index_best_test.npz"))
    # Indexed at 72 pixels, each photo averaged with its mirror image, biased by the train captions.
    assert ix.fingerprint == encoder.index_key(encoder.file_sha256(best), 72, True)
    bank = real_bank(model, tok, ck["args"]["data_dir"], torch.device("cpu")).half().float()
    scale = model.logit_scale.exp().item()
    emb, bias = torch.tensor(ix.emb).float(), torch.tensor(ix.bias)  # copies: the index is read-only
    assert torch.allclose(bias, retrieval.querybank_bias(emb, bank, scale), atol=1e-5)
    q = retrieval.encode_texts(model, tok, ["a red circle"], torch.device("cpu"))
    expect = (q @ emb.T)[0] - bias
    order = expect.argsort(descending=True)
    assert [h["path"] for h in hits] == [os.path.join(ck["args"]["data_dir"], "images", ix.paths[i]) for i in order]
    assert [h["score"] for h in hits] == pytest.approx(expect[order].tolist(), abs=1e-5)
    assert search.main(argv) == 0 and banks == [1]  # the stored index answers: no bank encoded again
    os.remove(tmp_path / "m" / "index_best_test.npz")  # photos to encode again: the stored bank serves
    capsys.readouterr()
    assert search.main(argv) == 0 and banks == [1] and json.loads(capsys.readouterr().out) == hits

    # Without its training captions, search.py says so and ranks by cosine similarity.
    capsys.readouterr()
    photos = os.path.join(ck["args"]["data_dir"], "images")
    assert search.main([*argv[:2], "--images_dir", photos, "--data_dir", str(tmp_path), *argv[3:]]) == 0
    res = capsys.readouterr()
    assert "ranking by cosine similarity" in res.err
    hits = json.loads(res.out)
    # The folder's index file, not its embeddings' .npy beside it.
    [folder_index] = [n for n in os.listdir(tmp_path / "m")
                      if n.startswith("index_best_images-") and n.endswith(".npz")]
    plain = index.GalleryIndex.load(str(tmp_path / "m" / folder_index))
    assert plain.bias is None and len(plain) == 64
    assert hits[0]["score"] == pytest.approx((q @ torch.tensor(plain.emb).float().T).max().item(), abs=1e-5)


def test_resume_at_epoch_boundary_gives_the_same_weights(tiny_data, tmp_path, monkeypatch):
    common = ("--epochs", "2")
    assert train.main(train_argv(tiny_data, tmp_path / "a", *common)) == 0

    def stop(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train, "plot_curves", stop)  # runs right after epoch 1's checkpoint is written
        assert train.main(train_argv(tiny_data, tmp_path / "b", *common)) == 130
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(SystemExit, match="--resume"):  # never silently overwrite a run
        train.main(train_argv(tiny_data, tmp_path / "b", *common))
    assert train.main(train_argv(tiny_data, tmp_path / "b", *common, "--resume")) == 0
    a, b = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_resume_keeps_the_model_and_inference_options_of_the_run(tiny_data, tmp_path):
    opts = ("--eval_image_size", "72", "--eval_flip", "--querybank")
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "1", *opts)) == 0
    # Flags not repeated, or other ones: the model is the run's; only training follows the new flags.
    other = ("--embedding_dim", "16", "--text_pooling", "mean", "--temperature", "0.5", "--eval_image_size", "96",
             "--lr", "3e-3")
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "2", "--resume", *other)) == 0
    args = torch.load(tmp_path / "last.pt", weights_only=True)["args"]
    assert (args["eval_image_size"], args["eval_flip"], args["querybank"]) == (72, True, True)
    assert (args["embedding_dim"], args["text_pooling"], args["temperature"], args["lr"]) == (32, "cls", 0.07, 3e-3)


def test_ctrl_c_mid_epoch_saves_position_and_resume_finishes(tiny_data, tmp_path, monkeypatch):
    trained = []  # the photos of each batch trained
    real = train.batch_loss

    def interrupt_on_fourth(net, batch, *a, **k):
        if len(trained) == 3:
            raise KeyboardInterrupt
        trained.append(batch["image_ids"].tolist())
        return real(net, batch, *a, **k)
    monkeypatch.setattr(train, "batch_loss", interrupt_on_fourth)
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "1")) == 130
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (0, 3, 3)
    monkeypatch.setattr(train, "batch_loss", lambda net, batch, *a, **k: trained.append(
        batch["image_ids"].tolist()) or real(net, batch, *a, **k))
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "1", "--resume")) == 0
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 15)  # 240 pairs / 16 per batch
    # Every batch of the epoch's order once, in order: none trained twice, none skipped.
    ids = PairDataset(tiny_data, "train", 64).image_ids
    order = epoch_order(ids, 42, 0)
    assert trained == [[ids[i] for i in order[b * 16:(b + 1) * 16]] for b in range(15)]


def test_validate_from_skips_early_epochs_and_picks_best_among_the_rest(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = train.evaluate_split

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate_split", counted)
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "3", "--validate_from", "2")) == 0
    history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [h["val"] is None for h in history] == [True, False, False] and len(calls) == 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    picked = max((2, 3), key=lambda e: history[e - 1]["val"]["rsum"])  # the first of equals: best.pt needs a rise
    assert best["epoch"] == picked and best["metrics"] == history[picked - 1]["val"]
    assert os.path.getsize(tmp_path / "training_curves.png") > 0
    # A run that --max_steps ends before --validate_from still validates its last epoch.
    assert train.main(train_argv(tiny_data, tmp_path / "short", "--epochs", "3", "--validate_from", "3",
                                 "--max_steps", "16")) == 0
    history = [json.loads(line) for line in open(tmp_path / "short" / "metrics.jsonl")]
    assert [h["val"] is None for h in history] == [True, False] and os.path.exists(tmp_path / "short" / "best.pt")
    with pytest.raises(SystemExit, match="2"):
        train.get_args(["--epochs", "3", "--validate_from", "4"])


def test_batch_larger_than_split_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="larger than the training split"):
        train.main(train_argv(tiny_data, tmp_path, "--batch_size", "4096"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    assert train.main(train_argv(tiny_data, tmp_path, "--epochs", "1")) == 0
    good = weights(tmp_path / "last.pt")
    monkeypatch.setattr(train, "info_nce", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(SystemExit, match="loss became nan"):
        train.main(train_argv(tiny_data, tmp_path, "--epochs", "2", "--resume"))
    kept = weights(tmp_path / "last.pt")
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_data_loader_workers_default_to_at_most_the_cores(monkeypatch):
    # four workers, but not more than the machine has cores (a 2-core laptop would only contend)
    for cores, want in ((2, 2), (1, 1), (16, 4)):  # the cores this process may use (taskset, a container)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        assert train.get_args([]).num_workers == want
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows: the machine's
    for cores, want in ((2, 2), (16, 4), (None, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert train.get_args([]).num_workers == want
    assert train.get_args(["--num_workers", "3"]).num_workers == 3
