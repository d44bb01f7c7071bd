//! A Hugging Face ZAYA `config.json` (transformers' `ZayaConfig`) → `.attn` text: one attention
//! block per layer type the model uses (`hybrid`: causal; `hybrid_sliding`: a sliding window),
//! with the fields transformers would default where the config omits them. What
//! `ccc spec --from-hf` prints; [`super::parse_and_check`] then holds it to every rule of the
//! language.

use serde_json::{Map, Value};

/// Why a config does not describe layers this converter can write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfConfigError(pub String);

impl std::fmt::Display for HfConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// RoPE of a layer type when the config gives none: `ZayaConfig.__post_init__`'s defaults
/// (θ, fraction).
fn default_rope(layer_type: &str) -> (f64, f64) {
    if layer_type == "hybrid_sliding" { (10_000.0, 0.5) } else { (5_000_000.0, 0.5) }
}

/// The `.attn` text of the attention layers `config_json` describes, blocks named `name` (the
/// causal layers) and `name_sliding` (the sliding-window ones).
pub fn attn_from_hf_config(config_json: &str, name: &str) -> Result<String, HfConfigError> {
    let fail = |message: String| Err(HfConfigError(message));
    let config: Value = match serde_json::from_str(config_json) {
        Ok(config) => config,
        Err(error) => return fail(format!("not valid JSON: {error}")),
    };
    let Some(config) = config.as_object() else {
        return fail("not a JSON object".into());
    };
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "zaya" {
        return fail(format!(
            "model_type is `{model_type}`, not `zaya`: --from-hf reads the configs of ZAYA models (transformers' ZayaConfig)"
        ));
    }
    let hidden_size = integer(config, "hidden_size", 2048)?;
    let query_heads = integer(config, "num_attention_heads", 8)?;
    // Zyphra's vLLM and SGLang configs name the kv heads `num_query_groups`.
    let kv_heads = match config.get("num_key_value_heads") {
        Some(_) => integer(config, "num_key_value_heads", 2)?,
        None => integer(config, "num_query_groups", 2)?,
    };
    let head_dim = integer(config, "head_dim", 128)?;
    if kv_heads % 2 != 0 {
        return fail(format!(
            "num_key_value_heads is {kv_heads}: ZAYA takes half the value channels from the previous token, \
             which ccc expresses in whole kv heads (value_shift), so it needs an even number"
        ));
    }
    let widths = [integer(config, "cca_time0", 2)?, integer(config, "cca_time1", 2)?];
    let bias = boolean(config, "attention_bias", false)?;
    // ZAYA1's HF layer uses the temperature as it is; the serving stacks' `clamp_temp` takes
    // exp(clamp(temp, 1e-7, 2)).
    let temperature = if boolean(config, "clamp_temp", false)? { "learned_exp" } else { "learned" };
    let dtype = match config.get("dtype").or_else(|| config.get("torch_dtype")).and_then(Value::as_str) {
        Some("float16") => "f16",
        _ => "bf16",
    };
    let layer_types = layer_types(config)?;

    let mut text = String::from("// Written by `ccc spec --from-hf` from a ZAYA config.json.\n");
    let mut seen: Vec<&str> = Vec::new();
    for layer_type in &layer_types {
        if seen.contains(&layer_type.as_str()) {
            continue;
        }
        seen.push(layer_type);
        let (block_name, mask) = match layer_type.as_str() {
            "hybrid" => (name.to_string(), "causal".to_string()),
            "hybrid_sliding" => match config.get("sliding_window").and_then(Value::as_u64) {
                Some(window) if window > 0 => (format!("{name}_sliding"), format!("sliding_window({window})")),
                _ => return fail("layer_types has `hybrid_sliding` layers but sliding_window is not a positive integer".into()),
            },
            other => return fail(format!("layer type `{other}` is not one of ZAYA's (`hybrid`, `hybrid_sliding`)")),
        };
        let (theta, fraction) = rope(config, layer_type)?;
        let layers: Vec<usize> =
            layer_types.iter().enumerate().filter(|(_, each)| *each == layer_type).map(|(index, _)| index).collect();
        text.push_str(&format!(
            "// Layers {} (`{layer_type}`): in transformers' checkpoints, weights under model.layers.N.self_attn.\n",
            ranges(&layers)
        ));
        text.push_str(&format!(
            "attention {block_name} {{\n    model_dim       = {hidden_size}\n    head_dim        = {head_dim}\n    \
             query_heads     = {query_heads}\n    kv_heads        = {kv_heads}\n    \
             qk_conv {{ depthwise(width = {}); per_head(width = {}) }}\n    qk_mean         = true\n    \
             value_shift     = {}\n    qk_norm         = l2\n    key_temperature = {temperature}\n    \
             rope {{ fraction = {fraction:?}, theta = {theta:?}, style = neox }}\n    mask            = {mask}\n    \
             dtype           = {dtype}\n    bias            = {bias}\n}}\n",
            widths[0],
            widths[1],
            kv_heads / 2,
        ));
    }
    Ok(text)
}

fn integer(config: &Map<String, Value>, key: &str, default: u64) -> Result<u64, HfConfigError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value.as_u64().ok_or_else(|| HfConfigError(format!("{key} is {value}, not a non-negative integer"))),
    }
}

fn boolean(config: &Map<String, Value>, key: &str, default: bool) -> Result<bool, HfConfigError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value.as_bool().ok_or_else(|| HfConfigError(format!("{key} is {value}, not true or false"))),
    }
}

/// `layer_types`, or every layer `hybrid` (`num_hidden_layers` of them) as transformers fills it.
fn layer_types(config: &Map<String, Value>) -> Result<Vec<String>, HfConfigError> {
    match config.get("layer_types") {
        None | Some(Value::Null) => Ok(vec!["hybrid".to_string(); integer(config, "num_hidden_layers", 40)? as usize]),
        Some(Value::Array(types)) if !types.is_empty() => types
            .iter()
            .map(|each| each.as_str().map(str::to_string).ok_or_else(|| HfConfigError(format!("layer_types holds {each}, not a name"))))
            .collect(),
        Some(other) => Err(HfConfigError(format!("layer_types is {other}, not a list of layer types"))),
    }
}

/// (θ, fraction) of a layer type as transformers' `ZayaRotaryEmbedding` reads them: from
/// `rope_parameters[layer_type]` (no `partial_rotary_factor` there: the whole head rotates), or
/// `ZayaConfig`'s per-type defaults when the config has no `rope_parameters` at all. Top-level
/// `rope_theta` / `partial_rotary_factor` keys are not read, as transformers does not read them.
fn rope(config: &Map<String, Value>, layer_type: &str) -> Result<(f64, f64), HfConfigError> {
    let Some(parameters) = config.get("rope_parameters").filter(|value| !value.is_null()) else {
        return Ok(default_rope(layer_type));
    };
    let Some(own) = parameters.get(layer_type).and_then(Value::as_object) else {
        return Err(HfConfigError(format!(
            "rope_parameters has no `{layer_type}` entry: transformers' ZAYA reads one per layer type"
        )));
    };
    let number = |key: &str| -> Result<Option<f64>, HfConfigError> {
        match own.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_f64()
                .map(Some)
                .ok_or_else(|| HfConfigError(format!("rope_parameters.{layer_type}.{key} is {value}, not a number"))),
        }
    };
    if let Some(kind) = own.get("rope_type").and_then(Value::as_str)
        && kind != "default"
    {
        return Err(HfConfigError(format!(
            "the `{layer_type}` layers' rope_type is `{kind}`: ccc's RoPE has no frequency scaling (only `default`)"
        )));
    }
    let theta = number("rope_theta")?
        .ok_or_else(|| HfConfigError(format!("rope_parameters.{layer_type} has no rope_theta")))?;
    Ok((theta, number("partial_rotary_factor")?.unwrap_or(1.0)))
}

/// "0-3, 7, 9-10".
fn ranges(layers: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < layers.len() {
        let start = layers[index];
        let mut end = start;
        while index + 1 < layers.len() && layers[index + 1] == end + 1 {
            index += 1;
            end += 1;
        }
        parts.push(if end == start { start.to_string() } else { format!("{start}-{end}") });
        index += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn layer_lists_read_as_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(ranges(&[5]), "5");
    }
}
