//! Which path each request asks for: `--path-mix '/=90,/slow=10'` is 90 % `/` and 10 % `/slow`.

use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMix {
    /// Paths with their cumulative weights, in the order given.
    entries: Vec<(String, u32)>,
}

impl PathMix {
    pub fn single(path: &str) -> Self {
        Self {
            entries: vec![(path.to_owned(), 1)],
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn path(&self, index: usize) -> &str {
        &self.entries[index].0
    }

    /// A path index with the given weights; `state` is the worker's own xorshift state, so
    /// workers need no shared random source and a run is repeatable.
    pub fn pick(&self, state: &mut u64) -> usize {
        let total = self.entries.last().map_or(1, |e| e.1);
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let roll = (*state % u64::from(total)) as u32;
        self.entries.iter().position(|e| roll < e.1).unwrap_or(0)
    }
}

impl FromStr for PathMix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut total = 0u32;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, weight) = part
                .rsplit_once('=')
                .ok_or_else(|| format!("`{part}` is not PATH=WEIGHT, like /slow=10"))?;
            if !path.starts_with('/') {
                return Err(format!("`{path}` is not a path: paths start with /"));
            }
            let weight: u32 = weight
                .parse()
                .map_err(|_| format!("`{weight}` in `{part}` is not a whole number"))?;
            if weight == 0 {
                continue;
            }
            total = total
                .checked_add(weight)
                .ok_or_else(|| "the weights add up to too much".to_owned())?;
            entries.push((path.to_owned(), total));
        }
        if entries.is_empty() || entries.len() > 255 {
            return Err(format!(
                "`{s}` names no path with a weight above 0 (or more than 255)"
            ));
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_set_the_share_of_each_path() {
        let mix: PathMix = "/=90, /slow=10".parse().unwrap();
        let mut state = 7;
        let mut slow = 0;
        for _ in 0..10_000 {
            if mix.path(mix.pick(&mut state)) == "/slow" {
                slow += 1;
            }
        }
        assert!((800..1200).contains(&slow), "{slow} of 10000");
    }

    #[test]
    fn bad_mixes_say_what_is_wrong() {
        for bad in ["", "/=0", "slow=10", "/=ten", "/"] {
            assert!(bad.parse::<PathMix>().is_err(), "{bad}");
        }
        assert_eq!("/a=1".parse::<PathMix>().unwrap(), PathMix::single("/a"));
    }
}
