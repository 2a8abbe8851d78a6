"""The fit of `fedpeat calibrate` (pure numpy): the single-source response
``ppl_t = P + (ppl_{t-1} - P) exp(-eta f_t)`` fitted to measured curves per emulator level and per
server domain, the participation drift fitted to fixed-subset curves, the two-source prediction of
mixed rounds, and the CalibrationTable built from the fits. The measurement is in `calibrate.py`."""

from __future__ import annotations

import numpy as np

from fedpeat_jax.mec import system
from fedpeat_jax.mec.calibration import CalibrationTable, ServerResponse, model_shape

FIT_TOLERANCE = 0.10  # stated tolerance: simulated curves within 10% of every measured point


def simulate(ppl0: float, fractions, ppl_inf: float, eta: float, drift: float = 0.0, repeat=None) -> np.ndarray:
    """The single-source response's curve [ppl_0, ppl_1, ...] driven by per-round data fractions;
    with ``drift``, the fixed point of each round rises by its repeat share (``repeat``, per round)
    as in the environment (``system.drifting_fixed_point``)."""
    repeat = np.zeros(len(fractions)) if repeat is None else repeat
    out = [float(ppl0)]
    for f, rho in zip(fractions, repeat):
        target = system.drifting_fixed_point(ppl_inf, drift, rho, f)
        out.append(float(system.surrogate_perplexity(out[-1], target, eta, f)))
    return np.asarray(out)


def _log_error(curves: list, P: float, eta: float) -> float:
    return sum(float(np.sum((np.log(simulate(p[0], f, P, eta)) - np.log(p)) ** 2)) for p, f in curves)


def curve_errors(curves: list, ppl_inf: float, eta: float) -> list:
    """Worst relative error max_t |simulated / measured - 1| of each curve."""
    return [float(np.max(np.abs(simulate(p[0], f, ppl_inf, eta) / p - 1))) for p, f in curves]


def fit_level(curves: list) -> dict:
    """Fit (ppl_inf, eta) to curves [(ppl array of R+1, fraction array of R)] of one level or domain.

    A grid of ppl_inf in [0.3 min, 1.5 max] of the measured values by eta in [1e-3, 30]
    (log-spaced) gives a start; Nelder-Mead on the simulated curves' log error refines both.
    The fixed point may lie above the measurements (data that makes the perplexity worse).
    """
    from scipy.optimize import minimize

    lo = 0.3 * min(float(np.min(p)) for p, _ in curves)
    hi = 1.5 * max(float(np.max(p)) for p, _ in curves)
    grid_p = np.linspace(lo, hi, 121)
    grid_e = np.geomspace(1e-3, 30.0, 61)
    errors = np.array([[_log_error(curves, P, e) for e in grid_e] for P in grid_p])
    i, j = np.unravel_index(int(np.argmin(errors)), errors.shape)

    def to_ppl(z):  # keeps ppl_inf inside the grid's range
        return lo + (hi - lo) / (1.0 + np.exp(-z))

    u = np.clip((grid_p[i] - lo) / (hi - lo), 1e-6, 1 - 1e-6)
    x0 = np.array([np.log(u / (1 - u)), np.log(grid_e[j])])
    x = minimize(
        lambda x: _log_error(curves, to_ppl(x[0]), float(np.exp(x[1]))),
        x0,
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000},
    ).x
    ppl_inf, eta = float(to_ppl(x[0])), float(np.exp(x[1]))
    errs = curve_errors(curves, ppl_inf, eta)
    return {"ppl_inf": ppl_inf, "eta": eta, "max_rel_error": max(errs), "curve_rel_errors": errs}


def fit_drift(curves: list, ppl_inf: float, eta: float, repeated_from: int = 1) -> dict:
    """Fit the table's ``drift`` to fixed-subset curves [(ppl, fractions)] of one level whose
    (ppl_inf, eta) stay as fitted: the same clients every round, so the repeat share is 0 before
    round ``repeated_from`` (counting from 0) and 1 after. Bounded scalar search on the log error,
    never below the drift that would put a round's fixed point under 0; the worst relative error
    of every curve, with and without the drift term, is returned."""
    from scipy.optimize import minimize_scalar

    def repeat(f):
        return (np.arange(len(f)) >= repeated_from).astype(np.float64)

    def error(drift):
        return sum(
            float(np.sum((np.log(simulate(p[0], f, ppl_inf, eta, drift, repeat(f))) - np.log(p)) ** 2))
            for p, f in curves
        )

    # below this drift some round's fixed point would fall under 0 (and the curve's log with it)
    pull = max(float(np.max(repeat(f) * (1.0 / np.where(f > 0, f, 1.0) - 1.0))) for _, f in curves)
    lowest = -ppl_inf / max(pull, 1.0)
    drift = float(minimize_scalar(error, bounds=(lowest, ppl_inf), method="bounded", options={"xatol": 1e-6}).x)
    rel = lambda d: [  # noqa: E731
        float(np.max(np.abs(simulate(p[0], f, ppl_inf, eta, d, repeat(f)) / p - 1))) for p, f in curves
    ]
    return {"drift": drift, "curve_rel_errors": rel(drift), "curve_rel_errors_without_drift": rel(0.0)}


def predict_mixed(
    table: CalibrationTable, ppl0: float, dev_fractions, srv_fractions, k: float, domain: str
) -> np.ndarray:
    """The two-source model's curve for rounds with devices (level k) and the server together."""
    srv = table.server_response(domain)
    dev_inf = float(np.interp(k, table.k, table.ppl_inf))
    dev_eta = float(np.interp(k, table.k, table.eta))
    out = [float(ppl0)]
    for fd, fs in zip(dev_fractions, srv_fractions):
        out.append(float(system.two_source_perplexity(out[-1], dev_inf, dev_eta, fd, srv.ppl_inf, srv.eta, fs)))
    return np.asarray(out)


def fit_table(
    measured: dict,
    server: dict,
    *,
    model,
    model_name: str,
    l: int,
    r: int,
    ppl0: float,
    population,
    workload: dict,
    source: str,
    meta: dict,
) -> CalibrationTable:
    """A CalibrationTable from device curves {k: [(ppl, fractions), ...]} and server curves {domain: [...]}."""
    ks = sorted(measured)
    fits = {k: fit_level(measured[k]) for k in ks}
    server_fits = {d: fit_level(curves) for d, curves in server.items()}
    server_data = meta.get("server_examples", {})
    return CalibrationTable(
        model_name=model_name,
        model=model_shape(model),
        l=l,
        r=r,
        k=tuple(ks),
        ppl_inf=tuple(fits[k]["ppl_inf"] for k in ks),
        eta=tuple(fits[k]["eta"] for k in ks),
        ppl0=ppl0,
        server={d: ServerResponse(f["ppl_inf"], f["eta"], server_data.get(d, 1.0)) for d, f in server_fits.items()},
        server_domain=next(iter(server)),
        population=tuple(population),
        workload=workload,
        synthetic=False,
        source=source,
        meta={
            **meta,
            "fit": {"levels": {str(k): fits[k] for k in ks}, "server": server_fits},
            "fit_tolerance": FIT_TOLERANCE,
        },
    )


__all__ = ["FIT_TOLERANCE", "curve_errors", "fit_drift", "fit_level", "fit_table", "predict_mixed", "simulate"]
