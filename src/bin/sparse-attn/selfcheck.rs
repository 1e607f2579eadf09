//! `selfcheck` (every kernel family on this device against the f64 references, as the browser
//! demo does) and `explore` (what the browser demo computes, natively, as JSON).

use std::process::ExitCode;

use sparse_attn::{Error, Gpu, GpuOptions};

use crate::report::Table;

pub fn selfcheck(opts: &GpuOptions, seed: u64, json: bool) -> Result<ExitCode, Error> {
    let gpu = Gpu::new(opts)?;
    let checks = run_checks(&gpu, seed)?;
    let ok = checks.iter().all(|c| c.ok);
    if json {
        println!("{}", sparse_attn::selfcheck::to_json(&checks));
    } else {
        println!("device: {}", gpu.adapter());
        print_checks(&checks);
        println!(
            "{} (relative L2 error against the f64 references, tolerance {:.0e})",
            if ok {
                "all kernels agree"
            } else {
                "SOME KERNELS DISAGREE"
            },
            sparse_attn::selfcheck::TOLERANCE
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn explore(
    opts: &GpuOptions,
    config: &str,
    timing: bool,
    arrays: bool,
) -> Result<ExitCode, Error> {
    let cfg = sparse_attn::explore::ExploreConfig::from_json(config)?;
    let gpu = Gpu::new(opts)?;
    let r = pollster::block_on(sparse_attn::explore::explore(&gpu, &cfg, timing))?;
    let mut j = r.to_json();
    if !arrays && let Some(o) = j.as_object_mut() {
        for key in ["block_mass", "selection", "sparsity"] {
            o.remove(key);
        }
    }
    println!("{j}");
    Ok(ExitCode::SUCCESS)
}

/// `explore --gguf FILE --text TEXT`: the page's model mode, natively.
pub fn explore_model(
    opts: &GpuOptions,
    file: &std::path::Path,
    text: &str,
    view: &str,
    timing: bool,
    arrays: bool,
) -> Result<ExitCode, Error> {
    use sparse_attn::explore::model::{ModelSession, ModelView};
    let view = ModelView::from_json(view)?;
    let bytes = std::fs::read(file)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", file.display())))?;
    let gpu = Gpu::new(opts)?;
    let mut s = ModelSession::load(&gpu, &bytes)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", file.display())))?;
    let pre = pollster::block_on(s.prefill(&gpu, text))?;
    let mut j = pollster::block_on(s.view(&gpu, &view, timing))?;
    if let Some(o) = j.as_object_mut() {
        if !arrays {
            for key in ["block_mass", "selection", "sparsity"] {
                o.remove(key);
            }
        }
        o.insert("model".into(), s.info());
        o.insert("pieces".into(), pre["pieces"].clone());
    }
    println!("{j}");
    Ok(ExitCode::SUCCESS)
}

/// Every kernel family against the f64 references (`sparse_attn::selfcheck`).
pub fn run_checks(gpu: &Gpu, seed: u64) -> Result<Vec<sparse_attn::selfcheck::Check>, Error> {
    pollster::block_on(sparse_attn::selfcheck::selfcheck(gpu, seed))
}

/// The checks as a table: kernel, relative error, verdict.
pub fn print_checks(checks: &[sparse_attn::selfcheck::Check]) {
    let mut t = Table::new(&["  check", "rel. error", "result"]);
    for c in checks {
        t.row(vec![
            format!("  {}", c.name),
            format!("{:.2e}", c.error),
            if c.ok { "ok" } else { "FAILED" }.into(),
        ]);
    }
    t.print();
}
