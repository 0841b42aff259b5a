"""Decoding every PIL mode, bad files, resize modes, flips, rotations, normalisation."""

import numpy as np
import pytest
from PIL import Image

from murajax.data import images
from murajax.errors import UserError

MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
ONE_LEVEL = 1.0 / 255.0 / 0.224  # one uint8 step in normalised units (about)


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_grayscale_8bit(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = images.load_image(_save(tmp_path, "g.png", Image.fromarray(a)))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], a)


def test_rgb(tmp_path):
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10, 120, 250
    out = images.load_image(_save(tmp_path, "rgb.png", Image.fromarray(a)))
    np.testing.assert_array_equal(out, a)


def test_rgba_drops_alpha(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[..., :3] = [30, 60, 90]
    a[..., 3] = [[0, 255], [128, 10]]
    out = images.load_image(_save(tmp_path, "rgba.png", Image.fromarray(a)))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([30, 60, 90], (2, 2, 3)))


def test_la_drops_alpha(tmp_path):
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    a[..., 0] = [[5, 50], [100, 200]]
    a[..., 1] = 77
    image = Image.fromarray(a)
    path = _save(tmp_path, "la.png", image)
    assert Image.open(path).mode == "LA"
    out = images.load_image(path)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], a[..., 0])


def test_palette(tmp_path):
    image = Image.new("P", (3, 1))
    palette = [0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9)
    image.putpalette(palette)
    image.putdata([0, 1, 2])
    path = _save(tmp_path, "p.png", image)
    assert Image.open(path).mode == "P"
    out = images.load_image(path)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 0, 0], [0, 128, 255]])


def test_bilevel(tmp_path):
    image = Image.fromarray(np.asarray([[0, 255]], dtype=np.uint8)).convert("1")
    out = images.load_image(_save(tmp_path, "b.png", image))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])


def test_16bit_grayscale_scaled_to_8bit(tmp_path):
    a = np.asarray([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(a)
    path = _save(tmp_path, "g16.png", image)
    assert Image.open(path).mode.startswith("I")
    out = images.load_image(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32bit_integer_mode_I(tmp_path):
    a = np.asarray([[0, 65535, 514, 100000, -5]], dtype=np.int32)
    path = _save(tmp_path, "i32.tif", Image.fromarray(a))
    assert Image.open(path).mode == "I"
    out = images.load_image(path)
    # 0..65535 scaled like 16-bit; out of range clipped.
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 2, 255, 0])


@pytest.mark.parametrize(
    "name,content",
    [
        ("empty.png", b""),
        ("text.png", b"this is not an image\n"),
        ("truncated.png", None),
    ],
)
def test_bad_files_raise_user_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        good = _save(tmp_path, "good.png",
                      Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64),
                                                                        dtype=np.uint8)))
        data = good.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        images.load_image(path)
    message = str(e.value)
    assert str(path) in message
    assert "--config.data.on_bad_image=skip" in message
    assert "Remove it from the CSV" in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"gone.png: cannot read image \(file not found\)"):
        images.load_image(tmp_path / "gone.png")


def test_normalisation_is_imagenet():
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    black = np.zeros((4, 4, 3), dtype=np.uint8)
    out_white = images.preprocess(white, 8, "stretch")
    out_black = images.preprocess(black, 8, "stretch")
    assert out_white.shape == (8, 8, 3) and out_white.dtype == np.float32
    np.testing.assert_allclose(out_white, np.broadcast_to((1 - MEAN) / STD, (8, 8, 3)),
                               rtol=1e-6)
    np.testing.assert_allclose(out_black, np.broadcast_to(-MEAN / STD, (8, 8, 3)), rtol=1e-6)
    grey = np.full((4, 4, 3), 51, dtype=np.uint8)
    np.testing.assert_allclose(images.preprocess(grey, 4, "stretch")[0, 0], (0.2 - MEAN) / STD,
                               rtol=1e-5)


def test_rgb_channels_normalised_separately():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    a[..., 0] = 255
    out = images.preprocess(a, 4, "stretch")
    np.testing.assert_allclose(out[1, 1], [(1 - MEAN[0]) / STD[0], -MEAN[1] / STD[1],
                                           -MEAN[2] / STD[2]], rtol=1e-6)


def test_stretch_fills_the_square():
    wide = np.full((10, 40), 255, dtype=np.uint8)  # H=10, W=40
    out = images.preprocess(wide, 16, "stretch")
    white = (1 - MEAN[0]) / STD[0]
    np.testing.assert_allclose(out[1:-1, 1:-1, 0], white, rtol=1e-5)


def test_pad_keeps_aspect_ratio_centred_with_black():
    wide = np.full((10, 40), 255, dtype=np.uint8)  # aspect 4:1 -> 16 x 4 content
    out = images.preprocess(wide, 16, "pad")[:, :, 0]
    white = (1 - MEAN[0]) / STD[0]
    black = -MEAN[0] / STD[0]
    np.testing.assert_allclose(out[:6], black, rtol=1e-5)  # top padding
    np.testing.assert_allclose(out[10:], black, rtol=1e-5)  # bottom padding
    np.testing.assert_allclose(out[6:10, 1:-1], white, rtol=1e-5)  # content rows 6..9
    tall = np.full((40, 10), 255, dtype=np.uint8)
    out_tall = images.preprocess(tall, 16, "pad")[:, :, 0]
    np.testing.assert_allclose(out_tall, out.T, atol=1e-5)


def test_flip_mirrors_left_right():
    a = np.random.default_rng(1).integers(0, 256, (30, 20), dtype=np.uint8)
    flipped = images.preprocess(a, 12, "stretch", flip=True)
    expected = images.preprocess(np.ascontiguousarray(a[:, ::-1]), 12, "stretch")
    np.testing.assert_allclose(flipped, expected, atol=1.01 * ONE_LEVEL)
    assert not np.allclose(flipped, images.preprocess(a, 12, "stretch"))


def test_rotation_counter_clockwise_about_centre():
    a = np.zeros((16, 16), dtype=np.uint8)
    a[2:5, 2:14] = 255  # a bar near the top
    rotated = images.preprocess(a, 16, "stretch", angle=90.0)[:, :, 0]
    reference = images.preprocess(a, 16, "stretch")[:, :, 0]
    np.testing.assert_allclose(rotated, np.rot90(reference, 1), atol=1.01 * ONE_LEVEL)
    # Small rotations keep the centre and fill uncovered corners with black.
    bright = np.full((16, 16), 255, dtype=np.uint8)
    out = images.preprocess(bright, 16, "stretch", angle=30.0)[:, :, 0]
    assert out[8, 8] == pytest.approx((1 - MEAN[0]) / STD[0], rel=1e-5)
    assert out[0, 0] == pytest.approx(-MEAN[0] / STD[0], rel=1e-5)


def _pil_affine(image, size, resize, flip, angle):
    """PIL's own bilinear AFFINE transform with ``images``' coefficients: the geometry and edge
    rule that ``images.transform`` keeps while warping with OpenCV."""
    w, h = image.size
    coefficients = images._affine_coefficients(w, h, size, resize, flip, angle)
    return np.asarray(image.transform((size, size), Image.AFFINE, coefficients,
                                      resample=Image.BILINEAR, fillcolor=0))


@pytest.mark.parametrize("shape,size,resize", [
    ((37, 23), 32, "stretch"), ((37, 23), 32, "pad"), ((23, 37, 3), 16, "stretch"),
    ((23, 37, 3), 64, "pad"), ((50, 50), 50, "stretch"), ((90, 41), 30, "pad"),
])
def test_transform_is_pils_affine_within_one_grey_level_with_the_same_black(shape, size, resize):
    """Every flip and angle: pixels within one grey level of PIL's (OpenCV's fixed-point
    weights and 1/32-pixel positions, rounded where PIL truncates its doubles to uint8), and
    black in the same places. The source has no black, so black is exactly 'outside the source'."""
    rng = np.random.default_rng(size + len(shape))
    smooth = rng.integers(1, 256, (4, 4) + shape[2:], dtype=np.uint8)
    source = np.asarray(Image.fromarray(smooth).resize(shape[1::-1], Image.BICUBIC))
    source = np.maximum(source, 1)
    for flip in (False, True):
        for angle in (0.0, 90.0, -30.0, 17.3, 180.0):
            ours = images.transform(Image.fromarray(source), size, resize, flip=flip,
                                    angle=angle)
            pil = _pil_affine(Image.fromarray(source), size, resize, flip, angle)
            assert ours.shape == pil.shape and ours.dtype == np.uint8
            np.testing.assert_array_equal(ours == 0, pil == 0, err_msg=f"{flip=} {angle=}")
            assert np.abs(ours.astype(int) - pil).max() <= 1, (flip, angle)
            assert (ours == 0).any() == (resize == "pad" and shape[0] != shape[1] or angle % 90
                                         != 0), (flip, angle)
    # Arrays (a mirrored view too) and PIL images are the same input.
    mirrored = source[:, ::-1]
    np.testing.assert_array_equal(
        images.transform(mirrored, size, resize, angle=5.0),
        images.transform(Image.fromarray(np.ascontiguousarray(mirrored)), size, resize,
                         angle=5.0))


def test_downscaling_a_large_image_averages():
    a = np.zeros((512, 512), dtype=np.uint8)
    a[:, ::2] = 255  # fine stripes: a good resize gives mid grey, not stripes
    out = images.preprocess(a, 64, "stretch")[:, :, 0] * STD[0] + MEAN[0]
    assert out[4:-4, 4:-4].std() < 0.1
    assert abs(out[4:-4, 4:-4].mean() - 0.5) < 0.1


def test_bad_resize_and_size():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=r"^config.data.resize must be 'stretch' or 'pad', "
                                        r"got 'foo'$"):
        images.preprocess(a, 8, "foo")
    with pytest.raises(UserError, match="config.data.image_size must be a positive integer"):
        images.preprocess(a, 0, "pad")


def test_grey_colour_is_pil_luminance_and_exact_for_grey_stored_as_rgb():
    """config.data.colour='grey': a colour image becomes PIL's 'L' (ITU-R 601-2, integer
    weights), a grey image stored as RGB its own grey levels exactly, a grey image stays as it
    is; 'keep' changes nothing."""
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    grey = images.as_colour(colour, "grey")
    r, g, b = (colour[:, :, c].astype(np.int64) for c in range(3))
    assert grey.shape == (9, 7) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, (19595 * r + 38470 * g + 7471 * b + 2**15) >> 16)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(images.as_colour(np.stack([levels] * 3, axis=2), "grey"),
                                  levels)
    np.testing.assert_array_equal(images.as_colour(levels, "grey"), levels)
    np.testing.assert_array_equal(images.as_colour(colour, "keep"), colour)
    # preprocess applies it after the resize: a grey-stored-as-RGB image as its grey self.
    as_rgb = np.stack([levels] * 3, axis=2)
    np.testing.assert_array_equal(images.preprocess(as_rgb, 8, "stretch", colour="grey"),
                                  images.preprocess(levels, 8, "stretch"))
    tinted = (as_rgb * np.asarray([1.0, 0.9, 0.8])).astype(np.uint8)
    expected = images.normalize(images.as_colour(
        np.asarray(images.transform(Image.fromarray(tinted), 8, "stretch")), "grey"))
    np.testing.assert_array_equal(images.preprocess(tinted, 8, "stretch", colour="grey"),
                                  expected)


def test_bad_colour_is_a_user_error_naming_the_field():
    with pytest.raises(UserError, match="config.data.colour must be 'keep'.*or 'grey'.*'gray'"):
        images.check_colour("gray")


def test_channels_first_into_writes_the_transposed_planes_in_place():
    """A batch row's ``[3, H, W]`` gets ``pixels.transpose(2, 0, 1)``, in place, from pixels of
    any strides (a flipped or subsampled view too), and into planes OpenCV cannot write (a
    strided ``out``, numpy's path); the rest of the buffer is untouched."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for source in (pixels, pixels[:, ::-1], pixels[::2]):
        batch = np.full((2, 3) + source.shape[:2], 7, np.uint8)
        images.channels_first_into(source, batch[1])
        np.testing.assert_array_equal(batch[1], source.transpose(2, 0, 1))
        assert np.all(batch[0] == 7)
    wide = np.zeros((3, 20, 60), np.uint8)
    images.channels_first_into(pixels, wide[:, :, ::2])
    np.testing.assert_array_equal(wide[:, :, ::2], pixels.transpose(2, 0, 1))
    assert not wide[:, :, 1::2].any()
