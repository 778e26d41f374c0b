"""Captioning datasets: COCO Caption (Karpathy splits), Flickr30K, Web CapFilt, TextCaps, NoCaps."""
import collections
import glob
import logging
import os
import posixpath
import urllib.parse
from typing import Callable, Iterator, Sequence

from iblip_jax.data.readers.files import expect, field, first_file, join_path, load_json, make_record, rosetta_ocr

log = logging.getLogger(__name__)

def read_coco_caption(root: str, split: str = "train", image_dir: str | None = None, include_restval: bool = True,
                      dataset: str = "coco_caption") -> Iterator[dict]:
  """COCO Caption, Karpathy split: {root}/dataset_coco.json from Karpathy's caption_datasets.zip
  ({"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg", "cocoid", "split", "sentences":
  [{"raw", "tokens"}]}]}). Images at {image_dir}/{filepath}/{filename}, image_dir defaulting to root (holding
  train2014/ and val2014/). split: train (with restval, the usual 113K, unless include_restval=False), val, test.

  Without dataset_coco.json, BLIP/LAVIS's re-packaged coco_karpathy_{split}.json is read instead (LAVIS's
  coco/defaults_cap.yaml), from root or, as LAVIS stores it, {root}/annotations/ with images under {root}/images/:
  a list of {"image": "val2014/COCO_val2014_...jpg", "caption": str, "image_id"} (train: one item per caption,
  Karpathy train+restval already merged) or {"image", "caption": [str, ...]} (val, test). Its records are the same
  as dataset_coco.json's: one per image, captions in file order, id the COCO id from the file name (= cocoid)."""
  karpathy = os.path.join(root, "dataset_coco.json")
  lavis = [(os.path.join(root, f"coco_karpathy_{split}.json"), root),
           (os.path.join(root, "annotations", f"coco_karpathy_{split}.json"), os.path.join(root, "images"))]
  found = [(path, images) for path, images in lavis if os.path.isfile(path)]
  if os.path.isfile(karpathy) or not found:
    return _read_karpathy(karpathy, split, image_dir or root, include_restval, dataset)
  path, default_images = found[0]
  if split == "train" and not include_restval:
    raise ValueError(f"{path}: LAVIS's train file merges Karpathy train and restval; include_restval=False needs "
                     "Karpathy's dataset_coco.json, which keeps them apart")
  return _read_caption_list(path, image_dir or default_images, dataset)


def _read_caption_list(path: str, image_dir: str, dataset: str) -> Iterator[dict]:
  """BLIP/LAVIS caption lists ({"image", "caption": str | [str]} items), grouped into one record per image."""
  captions = collections.OrderedDict()  # image path -> captions, in order of first appearance
  for i, item in enumerate(expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    caption = field(item, "caption", path, where, (str, list))
    captions.setdefault(field(item, "image", path, where, str), []).extend(
        [caption] if isinstance(caption, str) else caption)
  for image, texts in captions.items():
    yield make_record(dataset, _coco_id(image), image=join_path(image_dir, image), captions=texts)


def _coco_id(image: str):
  """COCO_val2014_000000391895.jpg -> 391895 (BLIP's own rule for these files); other names keep their stem."""
  stem = os.path.splitext(os.path.basename(image))[0]
  last = stem.rsplit("_", 1)[-1]
  return int(last) if last.isdigit() else stem


def read_flickr30k(root: str, split: str = "test", image_dir: str | None = None) -> Iterator[dict]:
  """Flickr30K, Karpathy split: {root}/dataset_flickr30k.json (same layout as dataset_coco.json, no "filepath");
  images at {image_dir}/{filename}, image_dir defaulting to {root}/flickr30k-images (the official archive's folder).
  The paper reports the 1K test split."""
  image_dir = image_dir or os.path.join(root, "flickr30k-images")
  return _read_karpathy(os.path.join(root, "dataset_flickr30k.json"), split, image_dir, False, "flickr30k")


def _read_karpathy(path: str, split: str, image_dir: str, include_restval: bool, dataset: str) -> Iterator[dict]:
  images = field(load_json(path), "images", path, "top level", list)
  wanted = {split, "restval"} if split == "train" and include_restval else {split}
  for i, img in enumerate(images):
    where = f"record {i}"
    if field(img, "split", path, where) not in wanted:
      continue
    filename = field(img, "filename", path, where, str)
    sentences = field(img, "sentences", path, where, list)
    captions = [field(s, "raw", path, f"{where}, sentence {j}", str) for j, s in enumerate(sentences)]
    id_ = img["cocoid"] if "cocoid" in img else os.path.splitext(filename)[0]
    yield make_record(dataset, id_, image=join_path(image_dir, img.get("filepath", ""), filename), captions=captions)


def read_web_capfilt(root: str, ann_file: str = "ccs_synthetic_filtered_large.json", image_dir: str | None = None,
                     url_to_path: str | Callable[[str], str | None] | None = None) -> Iterator[dict]:
  """Web CapFilt: BLIP's bootstrapped captions (github.com/salesforce/BLIP, "Pre-training datasets download"), a JSON
  list of {"url": image URL, "caption": text}; default file the ViT-L CapFilt captions of CC3M+CC12M+SBU. The
  release has URLs only, so the images you downloaded are found through `url_to_path` (a config's
  reader_args.url_to_path), relative to image_dir (default root):
  - "basename": the URL's last path segment ("http://x.org/p/a.jpg?s=1" -> "a.jpg"), as `wget` saves files;
  - a .json file ({url: path}) or .tsv file (url <TAB> path per line), relative to root: e.g. made from
    img2dataset's output parquet (its "url" and "key" columns) or your downloader's log. URLs it does not list
    (dead links, ~10-20% of CC's) are left out, counted in one warning;
  - in Python, a function URL -> path (None: not downloaded).
  A list whose items carry "image" (a path, as BLIP's own pretrain_dataset reads and LAVIS's capfilt14m
  annotation.json has) needs none. Uncertain: which BLIP file (and whether COCO/VG images were included) made the
  paper's 14M "Web CapFilt"."""
  path = os.path.join(root, ann_file)
  image_dir = image_dir or root
  mapper = _url_mapper(url_to_path, root)
  missing = 0
  for i, item in enumerate(expect(load_json(path), list, path, "top level")):
    where = f"record {i}"
    caption = field(item, "caption", path, where, (str, list))
    image = _capfilt_image(item, path, where, image_dir, mapper)
    if image is None:
      missing += 1
      continue
    yield make_record("web_capfilt", i, image=image, captions=[caption] if isinstance(caption, str) else list(caption))
  if missing:
    log.warning("%s: %d records left out: url_to_path=%r gives no downloaded image for their URL", path, missing,
                url_to_path)


def _url_mapper(spec, root: str) -> Callable[[str], str | None] | None:
  """url_to_path as a function (see read_web_capfilt); None when not given."""
  if spec is None or spec == "":
    return None
  if callable(spec):
    return spec
  if spec == "basename":
    return lambda url: posixpath.basename(urllib.parse.urlsplit(url).path) or None
  path = join_path(root, spec)
  if spec.endswith(".json"):
    mapping = expect(load_json(path), dict, path, "top level (url_to_path: {url: path})")
  elif spec.endswith(".tsv"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: url_to_path file not found")
    mapping = {}
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          url, tab, local = line.rstrip("\n").partition("\t")
          if not tab or not local:
            raise ValueError(f"{path}: line {n}: expected 'url<TAB>path', got {line.strip()[:80]!r}")
          mapping[url] = local
  else:
    raise ValueError(f"url_to_path={spec!r}: expected 'basename', a .json file {{url: path}} or a .tsv file "
                     "(url<TAB>path per line), relative to the dataset folder")
  return mapping.get


def _capfilt_image(item: dict, path: str, where: str, image_dir: str, url_to_path) -> str | None:
  if "image" in item:
    return join_path(image_dir, field(item, "image", path, where, str))
  url = field(item, "url", path, where, str)
  if url_to_path is None:
    raise ValueError(f"{path}: {where}: has a 'url' but no 'image'; the released BLIP files list image URLs only: "
                     "download the images and set reader_args.url_to_path ('basename', or a .json/.tsv file mapping "
                     "each URL to its file), or add an 'image' path to each item")
  local = url_to_path(url)
  return None if local is None else join_path(image_dir, local)


def read_textcaps(root: str, split: str = "train", image_dir: str | None = None,
                  ocr_files: Sequence[str] | None = None) -> Iterator[dict]:
  """TextCaps: {root}/TextCaps_0.1_{split}.json ({"data": [{"image_id", "caption_str", "reference_strs", ...}]},
  one entry per caption; test entries have no caption). One record per image with its captions in file order.
  Images are TextVQA's: {image_dir}/{image_id}.jpg, image_dir defaulting to {root}/train_images (train, val) or
  {root}/test_images (test), as TextVQA's train_val_images.zip / test_images.zip unpack. TextCaps ships no OCR:
  "ocr_tokens" come from TextVQA's Rosetta OCR files (default: every {root}/TextVQA_Rosetta_OCR_v0.2_*.json)."""
  path = os.path.join(root, f"TextCaps_0.1_{split}.json")
  image_dir = image_dir or os.path.join(root, "test_images" if split == "test" else "train_images")
  if ocr_files is None:
    ocr_files = sorted(glob.glob(os.path.join(root, "TextVQA_Rosetta_OCR_v0.2_*.json")))
  ocr = rosetta_ocr(ocr_files)
  captions = collections.OrderedDict()  # image_id -> captions, in order of first appearance
  for i, entry in enumerate(field(load_json(path), "data", path, "top level", list)):
    where = f"record {i}"
    image_id = str(field(entry, "image_id", path, where))
    texts = captions.setdefault(image_id, [])
    if "caption_str" in entry:
      texts.append(expect(entry["caption_str"], str, path, f"{where}, key 'caption_str'"))
    elif not texts and entry.get("reference_strs"):
      texts.extend(entry["reference_strs"])
  for image_id, texts in captions.items():
    yield make_record("textcaps", image_id, image=join_path(image_dir, f"{image_id}.jpg"), captions=texts or None,
                      ocr_tokens=ocr.get(image_id))


def read_nocaps(root: str, split: str = "val", image_dir: str | None = None) -> Iterator[dict]:
  """NoCaps: {root}/nocaps_val_4500_captions.json (COCO caption format: "images" [{"id", "file_name",
  "open_images_id", "domain", ...}], "annotations" [{"image_id", "caption"}], 10 captions per image); for test, or
  val without captions, nocaps_{split}_image_info.json. Images at {image_dir}/{file_name}, or at
  {image_dir}/{split}/{file_name} where only that exists (LAVIS's download_nocaps.py saves them to
  nocaps/images/{val,test}/); image_dir defaults to {root}/images."""
  path = first_file([os.path.join(root, f"nocaps_{split}_4500_captions.json"),
                     os.path.join(root, f"nocaps_{split}_image_info.json")], f"NoCaps {split} annotation file")
  data = load_json(path)
  images = field(data, "images", path, "top level", list)
  captions = collections.defaultdict(list)
  for i, ann in enumerate(data.get("annotations") or []):
    captions[field(ann, "image_id", path, f"annotation {i}")].append(
        field(ann, "caption", path, f"annotation {i}", str))
  image_dir = image_dir or os.path.join(root, "images")
  for i, img in enumerate(images):
    id_ = field(img, "id", path, f"image {i}")
    file_name = field(img, "file_name", path, f"image {i}", str)
    flat, nested = join_path(image_dir, file_name), join_path(image_dir, split, file_name)
    image = nested if not os.path.exists(flat) and os.path.exists(nested) else flat
    # the image's domain (in-domain / near-domain / out-domain): NoCaps reports CIDEr per domain and overall
    yield make_record("nocaps", id_, image=image, captions=captions.get(id_), domain=img.get("domain"))
