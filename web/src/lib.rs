//! The browser side of the demo: the library's own kernels on the visitor's GPU through
//! WebGPU. `web/app.js` opens a [`Demo`] and calls [`Demo::run`] with a JSON configuration
//! (see `sparse_attn::explore::ExploreConfig`); everything shown on the page comes from the
//! JSON it returns. The model mode loads a GGUF file the visitor picks ([`Demo::load_model`]:
//! the bytes stay in the page), runs it over their text ([`Demo::model_prefill`]) and draws a
//! layer and head of it ([`Demo::model_view`]; see `sparse_attn::explore::model`).

use std::cell::RefCell;
use std::rc::Rc;

use sparse_attn::explore::model::{ModelSession, ModelView};
use sparse_attn::explore::{ExploreConfig, explore};
use sparse_attn::{Gpu, GpuOptions};
use wasm_bindgen::prelude::*;

/// An open WebGPU device with the kernels' pipelines cached across runs.
#[wasm_bindgen]
pub struct Demo {
    gpu: Rc<Gpu>,
    /// The loaded model; taken out while a call of it runs (calls do not overlap).
    model: Rc<RefCell<Option<ModelSession>>>,
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
        Ok(Demo {
            gpu: Rc::new(gpu),
            model: Rc::new(RefCell::new(None)),
        })
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

    /// Load a GGUF model from the bytes of a file the visitor chose (replacing any earlier
    /// one); returns its shape as JSON (layers, heads, kv_heads, head_dim, vocab, ...).
    pub fn load_model(&self, bytes: Vec<u8>) -> Result<String, JsValue> {
        self.model.replace(None);
        let s = ModelSession::load(&self.gpu, &bytes).map_err(js_err)?;
        let info = s.info().to_string();
        self.model.replace(Some(s));
        Ok(info)
    }

    /// Run the loaded model over `text`; resolves to its tokens and next-token preview (JSON).
    pub fn model_prefill(&self, text: String) -> js_sys::Promise {
        let (gpu, model) = (self.gpu.clone(), self.model.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = take(&model)?;
            let r = s.prefill(&gpu, &text).await;
            model.replace(Some(s));
            Ok(JsValue::from_str(&r.map_err(js_err)?.to_string()))
        })
    }

    /// One layer and head of the prefilled text at a budget (a `ModelView` as JSON); resolves
    /// to the maps, numbers and both next-token previews (JSON).
    pub fn model_view(&self, view: String, timing: bool) -> js_sys::Promise {
        let (gpu, model) = (self.gpu.clone(), self.model.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let v = ModelView::from_json(&view).map_err(js_err)?;
            let s = take(&model)?;
            let r = s.view(&gpu, &v, timing).await;
            model.replace(Some(s));
            Ok(JsValue::from_str(&r.map_err(js_err)?.to_string()))
        })
    }
}

/// The model, out of its cell for one call.
fn take(model: &RefCell<Option<ModelSession>>) -> Result<ModelSession, JsValue> {
    model
        .take()
        .ok_or_else(|| JsError::new("no model loaded (or a call of it is still running)").into())
}
