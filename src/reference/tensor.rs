//! A dense row-major f64 tensor and the two error measures the validators use.

use crate::spec::DType;

use super::numeric::round_to_dtype;

/// Dense row-major f64 tensor: element (i0, i1, ..) sits at Σ i_k · Π_{m>k} shape[m].
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// A tensor whose data length must match its shape.
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Result<Tensor, String> {
        let tensor = Tensor { shape, data };
        tensor.check_consistent()?;
        Ok(tensor)
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let len = shape.iter().product();
        Tensor { shape, data: vec![0.0; len] }
    }

    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The fields are public, so a tensor can be built inconsistent; every entry point checks this.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.data.len() == self.numel() {
            Ok(())
        } else {
            Err(format!(
                "tensor of shape {:?} holds {} values, expected {}",
                self.shape,
                self.data.len(),
                self.numel()
            ))
        }
    }

    /// Flat offset of a multi-index, or None when it has the wrong rank or is out of range.
    pub fn offset(&self, index: &[usize]) -> Option<usize> {
        if index.len() != self.shape.len() {
            return None;
        }
        let mut offset = 0;
        for (&i, &extent) in index.iter().zip(&self.shape) {
            if i >= extent {
                return None;
            }
            offset = offset * extent + i;
        }
        Some(offset)
    }

    pub fn get(&self, index: &[usize]) -> Option<f64> {
        self.offset(index).and_then(|offset| self.data.get(offset).copied())
    }

    /// Like slice indexing: panics on a bad index. Meant for tests and for indices known valid.
    pub fn at(&self, index: &[usize]) -> f64 {
        match self.get(index) {
            Some(value) => value,
            None => panic!("index {index:?} out of range for shape {:?}", self.shape),
        }
    }

    pub fn set(&mut self, index: &[usize], value: f64) -> Result<(), String> {
        match self.offset(index) {
            Some(offset) if offset < self.data.len() => {
                self.data[offset] = value;
                Ok(())
            }
            _ => Err(format!("index {index:?} out of range for shape {:?}", self.shape)),
        }
    }

    /// Every value rounded to `dtype` (round to nearest, ties to even).
    pub fn rounded_to(&self, dtype: DType) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&x| round_to_dtype(x, dtype)).collect(),
        }
    }
}

fn same_shape(a: &Tensor, b: &Tensor) -> Result<(), String> {
    a.check_consistent()?;
    b.check_consistent()?;
    if a.shape == b.shape {
        Ok(())
    } else {
        Err(format!("shapes differ: {:?} against {:?}", a.shape, b.shape))
    }
}

/// max_i |a_i − b_i|; NaN when any difference is NaN, so that a NaN never passes a tolerance check.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64, String> {
    same_shape(a, b)?;
    let mut max = 0.0f64;
    for (x, y) in a.data.iter().zip(&b.data) {
        let diff = (x - y).abs();
        if diff.is_nan() {
            return Ok(f64::NAN);
        }
        max = max.max(diff);
    }
    Ok(max)
}

/// ‖a − b‖₂ / ‖b‖₂, with `b` the reference; the plain ‖a − b‖₂ when b is all zeros.
pub fn rel_l2_error(a: &Tensor, b: &Tensor) -> Result<f64, String> {
    same_shape(a, b)?;
    let diff: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.data.iter().map(|y| y * y).sum();
    Ok(if norm == 0.0 { diff.sqrt() } else { (diff / norm).sqrt() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexing_is_row_major_and_checked() {
        let mut t = Tensor::new(vec![2, 3], vec![0., 1., 2., 3., 4., 5.]).unwrap();
        assert_eq!(t.at(&[1, 2]), 5.0);
        assert_eq!(t.get(&[0, 3]), None);
        assert_eq!(t.get(&[1]), None);
        t.set(&[1, 0], 9.0).unwrap();
        assert_eq!(t.data[3], 9.0);
        assert!(t.set(&[2, 0], 1.0).is_err());
        assert!(Tensor::new(vec![2, 2], vec![1.0]).unwrap_err().contains("[2, 2]"));
    }

    #[test]
    fn error_measures() {
        let reference = Tensor::new(vec![2], vec![3.0, 4.0]).unwrap();
        let close = Tensor::new(vec![2], vec![3.0, 4.5]).unwrap();
        assert_eq!(max_abs_diff(&close, &reference).unwrap(), 0.5);
        assert_eq!(rel_l2_error(&close, &reference).unwrap(), 0.1);
        let nan = Tensor::new(vec![2], vec![f64::NAN, 4.0]).unwrap();
        assert!(max_abs_diff(&nan, &reference).unwrap().is_nan());
        assert!(rel_l2_error(&nan, &reference).unwrap().is_nan());
        let other_shape = Tensor::zeros(vec![1, 2]);
        assert!(max_abs_diff(&other_shape, &reference).unwrap_err().contains("[1, 2]"));
    }
}
