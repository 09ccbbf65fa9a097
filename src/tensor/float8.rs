//! The two float8 storage types, bit for bit as PyTorch defines them (`torch.float8_e4m3fn`,
//! `torch.float8_e5m2`). They hold frozen weights at one byte each (`--weight-dtype`); nothing
//! computes in them: a GEMM or convolution widens its float8 operand to the other operand's dtype
//! first, which is exact (every float8 value is a bf16, f16 and f32 value).
//!
//! Rounding is PyTorch's (measured on torch 2.15, `tests/fixtures/extra/fp8_encode.safetensors`,
//! every rounding case): from f32, to nearest with ties to even. e4m3fn has no infinity and
//! saturates: every magnitude from 448 up, infinities included, becomes +-448; NaN stays NaN.
//! e5m2 overflows to inf from 61440 (the tie above its largest value, 57344). Wider inputs go
//! through f32 first, as PyTorch's casts do.

use bytemuck::{Pod, Zeroable};

/// One `float8_e4m3fn` value: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities,
/// NaN at S.1111.111, largest finite 448.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(transparent)]
pub struct F8E4M3(pub u8);

/// One `float8_e5m2` value: sign, 5 exponent bits (bias 15), 2 mantissa bits; the top byte of an
/// IEEE f16, with its infinities and NaNs; largest finite 57344.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(transparent)]
pub struct F8E5M2(pub u8);

impl F8E4M3 {
    /// The largest finite magnitude.
    pub const MAX: f32 = 448.0;

    pub fn to_f32(self) -> f32 {
        let sign = if self.0 & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = ((self.0 >> 3) & 0xF, self.0 & 0x7);
        if e == 0xF && m == 0x7 {
            // c10's bit pattern: the sign kept, a quiet NaN with payload.
            f32::from_bits(((self.0 as u32 & 0x80) << 24) | 0x7ff0_0000)
        } else if e == 0 {
            sign * m as f32 * 2f32.powi(-9)
        } else {
            sign * (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
        }
    }

    pub fn from_f32(x: f32) -> F8E4M3 {
        const INF: u32 = 255 << 23;
        // 448.0: from here up (inf too) the answer saturates to 0x7e.
        const SATURATE_FROM: u32 = 0x43e0_0000;
        // Below 2^-6 the result is subnormal. Adding 2^14, whose f32 ulp is 2^-9 (the subnormal
        // step), leaves the value in units of 2^-9 in the low mantissa bits, rounded to nearest
        // even by the FPU itself.
        const DENORM_MAGIC: u32 = 141 << 23;
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let mag = bits & 0x7fff_ffff;
        let out = if mag > INF {
            0x7f
        } else if mag >= SATURATE_FROM {
            0x7e
        } else if mag < 121 << 23 {
            let r = (f32::from_bits(mag) + f32::from_bits(DENORM_MAGIC)).to_bits();
            r.wrapping_sub(DENORM_MAGIC) as u8
        } else {
            // Rebias the exponent (127 -> 7) and round the 20 dropped bits to nearest, ties to
            // even (the kept mantissa's lowest bit breaks the tie).
            let odd = (mag >> 20) & 1;
            let r = mag
                .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7ffff))
                .wrapping_add(odd);
            (r >> 20) as u8
        };
        F8E4M3(out | sign)
    }
}

impl F8E5M2 {
    /// The largest finite magnitude.
    pub const MAX: f32 = 57344.0;

    pub fn to_f32(self) -> f32 {
        half::f16::from_bits((self.0 as u16) << 8).to_f32()
    }

    pub fn from_f32(x: f32) -> F8E5M2 {
        const INF: u32 = 255 << 23;
        // From 2^16 the answer is inf directly; [61440, 65536) rounds up into the inf pattern
        // (the tie above 57344 goes to the even mantissa, which is inf's).
        const OVERFLOW_FROM: u32 = 143 << 23;
        // Below 2^-14, subnormal: 2^7 has an f32 ulp of 2^-16, e5m2's subnormal step.
        const DENORM_MAGIC: u32 = 134 << 23;
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let mag = bits & 0x7fff_ffff;
        let out = if mag >= OVERFLOW_FROM {
            if mag > INF {
                0x7f
            } else {
                0x7c
            }
        } else if mag < 113 << 23 {
            let r = (f32::from_bits(mag) + f32::from_bits(DENORM_MAGIC)).to_bits();
            r.wrapping_sub(DENORM_MAGIC) as u8
        } else {
            let odd = (mag >> 21) & 1;
            let r = mag
                .wrapping_add(((15u32).wrapping_sub(127) << 23).wrapping_add(0xfffff))
                .wrapping_add(odd);
            (r >> 21) as u8
        };
        F8E5M2(out | sign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips() {
        for b in 0..=255u8 {
            let e4 = F8E4M3(b);
            if !e4.to_f32().is_nan() {
                assert_eq!(F8E4M3::from_f32(e4.to_f32()), e4, "e4m3 byte {b:#04x}");
            }
            let e5 = F8E5M2(b);
            if !e5.to_f32().is_nan() {
                assert_eq!(F8E5M2::from_f32(e5.to_f32()), e5, "e5m2 byte {b:#04x}");
            }
        }
    }

    #[test]
    fn extremes() {
        assert_eq!(F8E4M3(0x7e).to_f32(), F8E4M3::MAX);
        assert_eq!(F8E5M2(0x7b).to_f32(), F8E5M2::MAX);
        assert_eq!(F8E4M3(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(F8E4M3::from_f32(f32::INFINITY).to_f32(), F8E4M3::MAX);
        assert_eq!(F8E4M3::from_f32(-1e6).to_f32(), -F8E4M3::MAX);
        assert!(F8E4M3::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(
            F8E5M2::from_f32(f32::NEG_INFINITY).to_f32(),
            f32::NEG_INFINITY
        );
    }
}
