//! The typed client of the API is `metal_client::api`, shared with the lab, image-builder and
//! the tests; metalctl calls it as `client::…` and names itself in the user agent.

pub use metal_client::api::*;

/// metalctl's client: [`Client::new_as`] with `metalctl/<version>` as the user agent.
pub fn connect(api_url: &str, token: Option<String>, ca_file: Option<&std::path::Path>) -> Result<Client> {
    Client::new_as(concat!("metalctl/", env!("CARGO_PKG_VERSION")), api_url, token, ca_file)
}
