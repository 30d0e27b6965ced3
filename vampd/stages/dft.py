"""Batched sub-pixel registration by upsampled cross-correlation.

Guizar-Sicairos, Thurman & Fienup (2008), "Efficient subpixel image registration algorithms",
Opt. Lett. 33, 156: the cross-correlation is computed once with FFTs, its integer peak is found,
then the continuous (band-limited) cross-correlation is evaluated on small upsampled grids around
that peak with matrix-multiply DFTs, so no large zero-padded FFT is needed. Everything is batched
over the leading (frame) axis: one call handles a whole cube of windows.

Conventions: arrays are ``(nframes, h, w)``, positions ``(y, x)``, pixel (0, 0) is the centre of the
first pixel.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["dft_centroid", "dft_shift", "upsampled_peak", "upsampled_dft"]


def upsampled_dft(spectrum: np.ndarray, y0: np.ndarray, x0: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Evaluate the inverse DFT of ``spectrum`` on a small grid around per-frame points.

    Parameters
    ----------
    spectrum : ndarray, shape (n, h, w), complex
        Unshifted 2-D spectra (``np.fft.fft2`` layout).
    y0, x0 : ndarray, shape (n,)
        Per-frame grid origin in pixels.
    gy, gx : ndarray, shape (my,) and (mx,)
        Grid offsets (pixels) shared by all frames.

    Returns
    -------
    ndarray, shape (n, my, mx), complex
        ``sum_k spectrum[k] exp(2 pi i (ky (y0 + gy) + kx (x0 + gx))) / (h w)``: the band-limited
        interpolant of ``ifft2(spectrum)`` (identical to it at integer positions).
    """
    n, h, w = spectrum.shape
    fy = np.fft.fftfreq(h)
    fx = np.fft.fftfreq(w)
    # the per-frame origin is a phase ramp on the spectrum; the grid matrices are then common to
    # all frames, so both products are single large matrix multiplications
    ramp = (
        np.exp(2j * np.pi * (np.asarray(y0)[:, None] * fy[None, :]))[:, :, None]
        * np.exp(2j * np.pi * (np.asarray(x0)[:, None] * fx[None, :]))[:, None, :]
    )
    shifted = spectrum * ramp  # (n, h, w)
    my_ = np.exp(2j * np.pi * np.outer(gy, fy))  # (my, h)
    mx_ = np.exp(2j * np.pi * np.outer(fx, gx))  # (w, mx)
    tmp = shifted.reshape(n * h, w) @ mx_  # (n*h, mx)
    tmp = tmp.reshape(n, h, -1)
    out = np.einsum("mh,nhx->nmx", my_, tmp, optimize=True)
    return out / (h * w)


def _parabolic(cm: np.ndarray, c0: np.ndarray, cp: np.ndarray) -> np.ndarray:
    """Vertex offset (in grid steps, clipped to ±0.5) of a parabola through 3 samples."""
    den = cm - 2.0 * c0 + cp
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (cm - cp) / den, 0.0)
    return np.clip(np.nan_to_num(off), -0.5, 0.5)


def _refine_peak(spectrum, py, px, factors, half_width=0.75):
    """Zoom on the interpolated peak: successive grids of step 1/factor, last refined by a parabola.

    ``py, px`` (n,) are the starting estimates (pixels); each stage samples ±``half_width`` previous
    steps around the current best point. Returns refined positions and the peak value.
    """
    step_prev = 1.0
    value = None
    for f in factors:
        step = 1.0 / f
        m = int(np.ceil(half_width * step_prev / step))
        grid = np.arange(-m, m + 1) * step
        cc = upsampled_dft(spectrum, py, px, grid, grid).real  # (n, 2m+1, 2m+1)
        flat = cc.reshape(len(py), -1).argmax(axis=1)
        iy, ix = np.unravel_index(flat, cc.shape[1:])
        py = py + grid[iy]
        px = px + grid[ix]
        value = cc[np.arange(len(py)), iy, ix]
        step_prev = step
    # final sub-grid refinement on the 3-point neighbourhood (peak not on the border -> safe)
    n = len(py)
    iyc = np.clip(iy, 1, cc.shape[1] - 2)
    ixc = np.clip(ix, 1, cc.shape[2] - 2)
    r = np.arange(n)
    oy = _parabolic(cc[r, iyc - 1, ixc], cc[r, iyc, ixc], cc[r, iyc + 1, ixc])
    ox = _parabolic(cc[r, iyc, ixc - 1], cc[r, iyc, ixc], cc[r, iyc, ixc + 1])
    inside_y = (iy >= 1) & (iy <= cc.shape[1] - 2)
    inside_x = (ix >= 1) & (ix <= cc.shape[2] - 2)
    py = py + np.where(inside_y, oy, 0.0) * step_prev
    px = px + np.where(inside_x, ox, 0.0) * step_prev
    return py, px, value


def _prepare(windows: np.ndarray) -> np.ndarray:
    """float64 copy with NaNs replaced by the per-frame median (a neutral value for the FFT)."""
    win = np.array(windows, dtype=np.float64, copy=True)
    bad = ~np.isfinite(win)
    if bad.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames
            med = np.nanmedian(win.reshape(win.shape[0], -1), axis=1)
        med = np.nan_to_num(med)
        win = np.where(bad, med[:, None, None], win)
    return win


def dft_shift(windows: np.ndarray, template: np.ndarray, upsample: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Shift ``(dy, dx)`` per frame that maps ``template`` onto each window.

    ``windows[t] ≈ template`` translated by ``(dy[t], dx[t])`` (content at ``(y, x)`` of the template is
    found at ``(y + dy, x + dx)`` in the window). Shifts are wrapped to ``[-h/2, h/2)``.

    Parameters
    ----------
    windows : ndarray, shape (n, h, w) or (h, w)
        Images; NaNs are replaced by the frame median.
    template : ndarray, shape (h, w)
        Reference image (same shape as one window).
    upsample : int
        Final upsampling factor of the matrix-DFT zoom (the result is additionally refined by a
        parabola through the finest grid, so the quantisation is well below ``1/upsample``).

    Returns
    -------
    dy, dx : ndarray, shape (n,)
    """
    windows = np.asarray(windows)
    squeeze = windows.ndim == 2
    if squeeze:
        windows = windows[None]
    template = np.asarray(template, dtype=np.float64)
    if template.shape != windows.shape[1:]:
        raise ValueError(f"dft_shift: template shape {template.shape} differs from window shape {windows.shape[1:]}")
    win = _prepare(windows)
    tmpl = np.nan_to_num(template)
    # a constant offset only adds a constant to the circular cross-correlation: remove the means
    # (the DC terms) so that the correlation peak stands out
    win -= win.mean(axis=(1, 2), keepdims=True)
    spec = np.fft.fft2(win) * np.conj(np.fft.fft2(tmpl - tmpl.mean()))[None]
    cc = np.fft.ifft2(spec).real
    n, h, w = cc.shape
    flat = cc.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, (h, w))
    py = np.where(iy >= (h + 1) // 2, iy - h, iy).astype(np.float64)
    px = np.where(ix >= (w + 1) // 2, ix - w, ix).astype(np.float64)
    factors = [f for f in (10, upsample) if f <= upsample] if upsample > 10 else [max(int(upsample), 1)]
    if upsample > 1:
        py, px, _ = _refine_peak(spec, py, px, factors)
    if squeeze:
        return py[0], px[0]
    return py, px


def dft_centroid(windows: np.ndarray, template: np.ndarray, upsample: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """PSF position per frame, in window coordinates, by cross-correlation with a centred template.

    The template's PSF is assumed centred at its geometric centre ``((h-1)/2, (w-1)/2)``; the
    returned position is that centre plus :func:`dft_shift`. Add the window origin for frame
    coordinates.

    Returns
    -------
    y, x : ndarray, shape (n,)
    """
    dy, dx = dft_shift(windows, template, upsample=upsample)
    h, w = np.shape(template)
    return (h - 1) / 2 + dy, (w - 1) / 2 + dx


def _pixel_transfer(n: int) -> np.ndarray:
    """Transfer function of a unit square pixel at the DFT frequencies of an n-sample axis."""
    return np.sinc(np.fft.fftfreq(n))


def upsampled_peak(
    images: np.ndarray,
    factor: int = 4,
    centers: np.ndarray | None = None,
    deconvolve_pixel: bool = True,
    search: float = 1.5,
) -> np.ndarray:
    """Peak value per frame of the Fourier-interpolated image.

    The image is Fourier-interpolated on a grid of step ``1/factor`` px covering ±``search`` px
    around ``centers`` (matrix DFT: only the needed points are computed), and the maximum is refined
    by a parabola through its neighbours. With ``deconvolve_pixel`` the spectrum is first divided by
    the pixel transfer function ``sinc(fy) sinc(fx)``, which undoes the pixel integration (the
    reference does the same with a 4x zero-padded FFT over the whole sub-image).

    Parameters
    ----------
    images : ndarray, shape (n, h, w) or (h, w)
        Sub-images (NaNs count as 0).
    factor : int
        Upsampling factor of the search grid.
    centers : ndarray, shape (n, 2), optional
        ``(y, x)`` of the expected peak in sub-image coordinates; default: the brightest pixel.
    deconvolve_pixel : bool
        Divide by the pixel transfer function before interpolating.
    search : float
        Half-width in pixels of the searched region.

    Returns
    -------
    ndarray, shape (n,) (or a scalar for one 2-D image)
    """
    images = np.asarray(images, dtype=np.float64)
    squeeze = images.ndim == 2
    if squeeze:
        images = images[None]
    img = np.nan_to_num(images)
    n, h, w = img.shape
    spec = np.fft.fft2(img)
    if deconvolve_pixel:
        spec = spec / (_pixel_transfer(h)[:, None] * _pixel_transfer(w)[None, :])[None]
    if centers is None:
        flat = img.reshape(n, -1).argmax(axis=1)
        cy, cx = np.unravel_index(flat, (h, w))
        centers = np.stack([cy, cx], axis=1).astype(np.float64)
    centers = np.asarray(centers, dtype=np.float64).reshape(n, 2)
    m = int(np.ceil(search * factor))
    grid = np.arange(-m, m + 1) / factor
    vals = upsampled_dft(spec, centers[:, 0], centers[:, 1], grid, grid).real
    r = np.arange(n)
    flat = vals.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, vals.shape[1:])
    peak = vals[r, iy, ix]
    # parabolic refinement of the peak height (separable, for a smooth maximum between grid nodes)
    iyc = np.clip(iy, 1, vals.shape[1] - 2)
    ixc = np.clip(ix, 1, vals.shape[2] - 2)
    c0 = vals[r, iyc, ixc]
    for cm, cp in (
        (vals[r, iyc - 1, ixc], vals[r, iyc + 1, ixc]),
        (vals[r, iyc, ixc - 1], vals[r, iyc, ixc + 1]),
    ):
        off = _parabolic(cm, c0, cp)
        # height of the parabola at its vertex: c0 - (cm - cp) * off / 4
        peak = peak - ((iyc == iy) & (ixc == ix)) * 0.25 * (cm - cp) * off
    return peak[0] if squeeze else peak
