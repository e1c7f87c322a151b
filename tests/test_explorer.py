"""The attention explorer (jattn.explorer): the page's data and errors, and the page itself
driven in a real headless Chromium (Debian's chromium and chromium-driver, installed by
.ci/run; there JATTN_REQUIRE_BROWSER=1 turns a missing browser into a failure)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import jax
import numpy as np
import pytest
from flax import nnx

from jattn.explorer import attention_explorer
from jattn.models import DecoderLM
from jattn.viz import collect_attention_weights

TOKENS = ["<s>", "the", "cat", "sat", "on", "mat"]


@pytest.fixture(scope="module")
def weights():
    """A small DecoderLM's collected weights: 2 layers of [B, 2, 6, 6]."""
    lm = DecoderLM(11, num_layers=2, features=8, num_heads=2, max_len=8, dropout_rate=0.0,
                   rngs=nnx.Rngs(0))  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, len(TOKENS)), 3, 11)
    return {k: np.asarray(v) for k, v in collect_attention_weights(lm, tokens).items()}


def page_data(explorer) -> dict:
    block = re.search(
        r'<script type="application/json" id="attention-data">(.*?)</script>', explorer.html, re.S
    )
    assert "<" not in block.group(1)  # no "</script>" nor "<!--" can move its end
    return json.loads(block.group(1))


def test_the_page_carries_the_weights_and_tokens(weights, tmp_path):
    explorer = attention_explorer(weights, TOKENS, batch_index=1, title="a </script> title")
    data = page_data(explorer)
    assert explorer.layers == list(weights) and len(data["layers"]) == 2
    for layer, (name, w) in zip(data["layers"], weights.items(), strict=True):
        assert layer["name"] == name and layer["q"] == TOKENS and layer["k"] == TOKENS
        np.testing.assert_allclose(layer["w"], w[1], rtol=0, atol=5e-5)  # rounded to 4 places
    assert data["title"] == "a </script> title"
    assert explorer.html.count("</script>") == 2  # the data block cannot end early
    # offline: nothing is fetched (no src/href, no URL but the SVG namespace)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", explorer.html))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"\b(src|href)\s*=", explorer.html)
    # in a notebook: an iframe holding the escaped page
    frame = explorer._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "<script" not in frame
    # saved atomically, readable as a plain write leaves it
    path = explorer.save(tmp_path / "sub" / "explorer.html")
    assert open(path, encoding="utf-8").read() == explorer.html
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~current_umask()
    assert os.listdir(tmp_path / "sub") == ["explorer.html"]


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_titles_and_tokens_are_shown_as_written():
    """A title naming a placeholder of the page was replaced by the page's data (its
    tokens unescaped, so a token's markup became live HTML) or its script; a "<!--" in a
    token put the data block's end out of reach."""
    w = np.full((1, 2, 2), 0.5)
    tokens = ["<img src=x onerror=alert(1)>", "<!--<script>"]
    for title in ("__DATA__", "__SCRIPT__", "__STYLE__", "__TITLE__"):
        explorer = attention_explorer({"layer": w}, tokens, title=title)
        assert f'<h1 id="title">{title}</h1>' in explorer.html
        assert f"<title>{title}</title>" in explorer.html
        data = page_data(explorer)
        assert data["title"] == title and data["layers"][0]["k"] == tokens
        assert "<img" not in explorer.html and explorer.html.count("<script") == 2


def test_cross_attention_layers_take_query_tokens():
    w = np.random.default_rng(0).dirichlet(np.ones(4), size=(2, 3))  # [N=2, T=3, S=4]
    explorer = attention_explorer({"cross": w}, ["a", "b", "c", "d"], query_tokens=["x", "y", "z"])
    layer = page_data(explorer)["layers"][0]
    assert layer["q"] == ["x", "y", "z"] and layer["k"] == ["a", "b", "c", "d"]
    per_layer = attention_explorer({"self": w[:, :, :3], "cross": w},
                                   {"self": ["x", "y", "z"], "cross": ["a", "b", "c", "d"]},
                                   query_tokens={"cross": ["x", "y", "z"]})  # fmt: skip
    assert [lay["q"] for lay in page_data(per_layer)["layers"]] == [["x", "y", "z"]] * 2


def test_bad_input_is_named(weights):
    w = np.full((2, 3, 3), 1 / 3)
    cases = [
        (ValueError, "tokens has 5 tokens but layer 'a''s weights have 3",
         dict(tokens=list("abcde"))),
        (ValueError, "has 3 queries and 4 keys: pass query_tokens",
         dict(weights={"a": np.full((2, 3, 4), 0.25)}, tokens=list("abcd"))),
        (TypeError, "tokens must be a list of token strings", dict(tokens="abc")),
        (TypeError, "tokens must be a list of token strings .*got NoneType", dict(tokens=None)),
        (ValueError, "batch_index=0 was given, but weights\\['a'\\] \\[2, 3, 3\\]",
         dict(batch_index=0)),
        (ValueError, "layer 'a''s weights hold NaN or inf", dict(weights={"a": w * np.nan})),
        (ValueError, "tokens has keys \\['b'\\] that name no layer", dict(tokens={"b": ["x"]})),
        (ValueError, "pass batch_index= to pick an example", dict(weights={"a": w[None]})),
        (TypeError, "title must be a string", dict(title=3)),
    ]  # fmt: skip
    for error, message, kw in cases:
        args = dict(weights={"a": w}, tokens=list("abc")) | kw
        with pytest.raises(error, match=message):
            attention_explorer(args.pop("weights"), args.pop("tokens"), **args)
    with pytest.raises(ValueError, match="more than an explorer page carries"):
        attention_explorer({"a": np.zeros((64, 256, 256))}, [str(i) for i in range(256)])


# ------------------------------------------------------------- in a real browser


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if not (chromium and driver and webdriver):
        if os.environ.get("JATTN_REQUIRE_BROWSER") == "1":
            pytest.fail("JATTN_REQUIRE_BROWSER=1 but chromium, chromedriver or selenium is missing")
        pytest.skip("needs Debian's chromium and chromium-driver and selenium (CI installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)  # fmt: skip
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_explorer_in_headless_chromium(weights, tmp_path):
    """The page loads without console errors; hovering a query shades the keys by its
    weights (mean over the chosen heads), another query changes them; a head chip and
    the model view's thumbnails pick the heads; hovering a key shows its column."""
    explorer = attention_explorer(weights, TOKENS, batch_index=0)
    path = explorer.save(tmp_path / "explorer.html")
    w = [np.asarray(v[0], np.float64) for v in weights.values()]  # [N, T, S] per layer
    driver = _browser()
    try:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        driver.get("file://" + str(path))
        assert driver.title == "Attention explorer"

        def hover(css: str, index: int) -> None:
            element = driver.find_elements(By.CSS_SELECTOR, css)[index]
            ActionChains(driver).move_to_element(element).perform()

        def shown(css: str) -> np.ndarray:
            return np.array([float(e.get_attribute("data-weight"))
                             for e in driver.find_elements(By.CSS_SELECTOR, css)])  # fmt: skip

        queries = driver.find_elements(By.CSS_SELECTOR, "text.query")
        assert [q.get_attribute("data-token") for q in queries] == TOKENS
        keys = driver.find_elements(By.CSS_SELECTOR, "text.key")
        assert [k.get_attribute("data-weight") for k in keys] == [""] * 6  # nothing hovered
        hover("text.query", 2)
        first = shown("text.key")
        np.testing.assert_allclose(first, w[0][:, 2].mean(0), atol=1e-4)
        hover("text.query", 5)
        np.testing.assert_allclose(shown("text.key"), w[0][:, 5].mean(0), atol=1e-4)
        assert np.max(np.abs(shown("text.key") - first)) > 1e-3  # the hover changed them
        assert "query 5 (mat)" in driver.find_element(By.ID, "readout").text
        # keys' side: hovering key 1 shows the queries' weights on it
        hover("text.key", 1)
        np.testing.assert_allclose(shown("text.query"), w[0][:, :, 1].mean(0), atol=1e-4)
        # one head: a double-click on its chip keeps only it
        chip = driver.find_elements(By.CSS_SELECTOR, ".chip")[1]
        ActionChains(driver).double_click(chip).perform()
        chips = driver.find_elements(By.CSS_SELECTOR, ".chip")
        assert [("off" in c.get_attribute("class")) for c in chips] == [True, False]
        hover("text.query", 3)
        np.testing.assert_allclose(shown("text.key"), w[0][1, 3], atol=1e-4)
        # the layer menu, then the model view: a thumbnail per layer and head
        Select(driver.find_element(By.ID, "layer")).select_by_index(1)
        hover("text.query", 4)
        np.testing.assert_allclose(shown("text.key"), w[1][:, 4].mean(0), atol=1e-4)
        Select(driver.find_element(By.ID, "view")).select_by_value("model")
        thumbs = driver.find_elements(By.CSS_SELECTOR, "#model-view canvas")
        assert len(thumbs) == 4 and driver.find_element(By.ID, "head-view").get_attribute("hidden")
        thumbs[2].click()  # layer 1, head 0
        assert driver.find_element(By.ID, "model-view").get_attribute("hidden")
        hover("text.query", 1)
        np.testing.assert_allclose(shown("text.key"), w[1][0, 1], atol=1e-4)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()
