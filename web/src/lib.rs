//! The browser side of the demo: the library's own kernels on the visitor's GPU through
//! WebGPU. `web/app.js` opens a [`Demo`] and calls [`Demo::run`] with a JSON configuration
//! (see `sparse_attn::explore::ExploreConfig`); everything shown on the page comes from the
//! JSON it returns.

use std::rc::Rc;

use sparse_attn::explore::{ExploreConfig, explore};
use sparse_attn::{Gpu, GpuOptions};
use wasm_bindgen::prelude::*;

/// An open WebGPU device with the kernels' pipelines cached across runs.
#[wasm_bindgen]
pub struct Demo {
    gpu: Rc<Gpu>,
}

fn js_err(e: sparse_attn::Error) -> JsValue {
    JsError::new(&e.to_string()).into()
}

#[wasm_bindgen]
impl Demo {
    /// Ask the browser for its WebGPU adapter and device (a promise of a `Demo`).
    pub async fn open() -> Result<Demo, JsValue> {
        let gpu = Gpu::new_async(&GpuOptions::default())
            .await
            .map_err(js_err)?;
        Ok(Demo { gpu: Rc::new(gpu) })
    }

    /// The adapter, as the page's header shows it.
    pub fn adapter(&self) -> String {
        self.gpu.adapter().to_string()
    }

    /// Check every kernel family on this GPU against the f64 references (see
    /// `sparse_attn::selfcheck`); resolves to `{"ok": bool, "checks": [...]}` as JSON.
    pub fn selfcheck(&self, seed: u32) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let checks = sparse_attn::selfcheck::selfcheck(&gpu, seed as u64)
                .await
                .map_err(js_err)?;
            Ok(JsValue::from_str(
                &sparse_attn::selfcheck::to_json(&checks).to_string(),
            ))
        })
    }

    /// Run one configuration (JSON) and resolve to the JSON the page draws.
    pub fn run(&self, config: String, timing: bool) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let cfg = ExploreConfig::from_json(&config).map_err(js_err)?;
            let r = explore(&gpu, &cfg, timing).await.map_err(js_err)?;
            Ok(JsValue::from_str(&r.to_json().to_string()))
        })
    }
}
