//! The OpenAPI document, generated from code: the schemas come from the wire types'
//! `utoipa::ToSchema` derives, the operations from the route table below (which mirrors
//! `http::router`). The document is checked in at `api/openapi.json`; a test fails when it drifts
//! (`UPDATE_OPENAPI=1 cargo test -p metal-api --test openapi` rewrites it).

use metal_types::*;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ArrayBuilder, ContentBuilder, OpenApi as Doc, Ref, Required, ResponseBuilder};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "metal-api",
        description = "The allocation API of the bare-metal cloud: partitions, sizes, images, layouts, projects, machines, allocations and the agent/boot contract."
    ),
    components(schemas(
        Partition,
        PartitionBoot,
        Size,
        SizeConstraint,
        ConstraintKind,
        ImageFormat,
        ImageClassification,
        ImageManifest,
        Image,
        GptType,
        GptPartition,
        LayoutDisk,
        FsKind,
        Filesystem,
        FilesystemLayout,
        Project,
        TokenRole,
        TokenRequest,
        TokenResponse,
        TokenInfo,
        Inventory,
        Cpu,
        Disk,
        Nic,
        Dmi,
        LldpNeighbor,
        RegisterRequest,
        RegisterResponse,
        EventReport,
        EventBatch,
        WipeReport,
        DiskWipe,
        InstallInstructions,
        PhoneHomeConfig,
        InstallReport,
        BootInfo,
        PhoneHome,
        Arch,
        BootRequest,
        BootDecision,
        PxeEvent,
        AllocationRequest,
        Allocation,
        Machine,
        MachineEvent,
        EventSource,
        ApiError,
        ProvisioningEvent,
        Liveliness,
        MachineId,
        AllocationId
    ))
)]
struct Schemas;

/// What a successful response carries.
enum Out {
    One(&'static str),
    Many(&'static str),
    Text,
    /// A JSON object without a named schema.
    Object,
    Empty,
}

struct Route {
    method: HttpMethod,
    path: &'static str,
    summary: &'static str,
    /// Who may call: shown in the description; `None` for open routes.
    auth: Option<&'static str>,
    body: Option<&'static str>,
    status: &'static str,
    out: Out,
}

const fn r(
    method: HttpMethod,
    path: &'static str,
    summary: &'static str,
    auth: Option<&'static str>,
    body: Option<&'static str>,
    status: &'static str,
    out: Out,
) -> Route {
    Route { method, path, summary, auth, body, status, out }
}

use HttpMethod::{Delete, Get, Post};

const ADMIN: Option<&str> = Some("admin");
const READ: Option<&str> = Some("admin or tenant");
const MACHINE: Option<&str> = Some("machine credential");

fn routes() -> Vec<Route> {
    let mut v = vec![
        r(Get, "/healthz", "Liveness of the API and its database: {\"status\": \"ok\"}", None, None, "200", Out::Object),
        r(Get, "/metrics", "Prometheus metrics", None, None, "200", Out::Text),
    ];
    for (plural, schema) in
        [("partitions", "Partition"), ("sizes", "Size"), ("layouts", "FilesystemLayout"), ("projects", "Project")]
    {
        let base: &'static str = Box::leak(format!("/v1/{plural}").into_boxed_str());
        let one: &'static str = Box::leak(format!("/v1/{plural}/{{id}}").into_boxed_str());
        v.push(r(
            Post,
            base,
            "Create (201), or 200 when an identical one exists; 409 when it differs",
            ADMIN,
            Some(schema),
            "201",
            Out::One(schema),
        ));
        v.push(r(Get, base, "List", READ, None, "200", Out::Many(schema)));
        v.push(r(Get, one, "Get one", READ, None, "200", Out::One(schema)));
        v.push(r(Delete, one, "Delete", ADMIN, None, "204", Out::Empty));
    }
    v.extend([
        r(
            Post,
            "/v1/images",
            "Add an image; its id is <name>-<version> from the manifest",
            ADMIN,
            Some("Image"),
            "201",
            Out::One("Image"),
        ),
        r(Get, "/v1/images", "List images", READ, None, "200", Out::Many("Image")),
        r(
            Get,
            "/v1/images/{id}",
            "An image by id, or by name: the newest version that has not expired",
            READ,
            None,
            "200",
            Out::One("Image"),
        ),
        r(Delete, "/v1/images/{id}", "Delete an image", ADMIN, None, "204", Out::Empty),
        r(
            Post,
            "/v1/tokens",
            "Create a token (shown once), optionally expiring",
            ADMIN,
            Some("TokenRequest"),
            "201",
            Out::One("TokenResponse"),
        ),
        r(
            Get,
            "/v1/tokens",
            "Admin, tenant and pixie tokens (never the tokens themselves)",
            ADMIN,
            None,
            "200",
            Out::Many("TokenInfo"),
        ),
        r(Delete, "/v1/tokens/{id}", "Revoke a token (409 for the last admin token)", ADMIN, None, "204", Out::Empty),
        r(Get, "/v1/machines", "Machines (tenants: those allocated to their project)", READ, None, "200", Out::Many("Machine")),
        r(Get, "/v1/machines/{id}", "One machine", READ, None, "200", Out::One("Machine")),
        r(
            Get,
            "/v1/machines/{id}/events",
            "A machine's provisioning events (tenants: from their allocation on)",
            READ,
            None,
            "200",
            Out::Many("MachineEvent"),
        ),
        r(
            Delete,
            "/v1/machines/{id}/allocation",
            "Free a machine: records Machine Reclaim",
            READ,
            None,
            "200",
            Out::One("Machine"),
        ),
        r(
            Post,
            "/v1/allocations",
            "Allocate a machine (201; 200 for a repeated idempotency key; 409 no_machine_available)",
            READ,
            Some("AllocationRequest"),
            "201",
            Out::One("Allocation"),
        ),
        r(Get, "/v1/allocations", "Active allocations", READ, None, "200", Out::Many("Allocation")),
        r(
            Post,
            "/v1/agent/register",
            "Register a machine with its inventory",
            Some("enrolment token"),
            Some("RegisterRequest"),
            "200",
            Out::One("RegisterResponse"),
        ),
        r(Post, "/v1/agent/events", "Report provisioning events", MACHINE, Some("EventBatch"), "204", Out::Empty),
        r(Post, "/v1/agent/wipe-report", "Report how the disks were wiped", MACHINE, Some("WipeReport"), "204", Out::Empty),
        r(
            Get,
            "/v1/agent/wait",
            "Long-poll for an allocation (200 with instructions, 204 after timeout_s); a heartbeat",
            MACHINE,
            None,
            "200",
            Out::One("InstallInstructions"),
        ),
        r(Post, "/v1/agent/install-report", "Report the result of an install", MACHINE, Some("InstallReport"), "204", Out::Empty),
        r(
            Post,
            "/v1/agent/phone-home",
            "The installed OS reports it booted",
            Some("phone-home token"),
            Some("PhoneHome"),
            "204",
            Out::Empty,
        ),
        r(
            Post,
            "/v1/boot/decide",
            "What a machine boots",
            Some("pixie or admin"),
            Some("BootRequest"),
            "200",
            Out::One("BootDecision"),
        ),
        r(
            Post,
            "/v1/boot/pxe-event",
            "pixie saw a PXE request: records PXE Booting for the registered machine that owns the MAC",
            Some("pixie or admin"),
            Some("PxeEvent"),
            "204",
            Out::Empty,
        ),
    ]);
    v
}

fn schema_ref(name: &str) -> Ref {
    Ref::from_schema_name(name)
}

fn error_response(what: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(what)
        .content("application/json", ContentBuilder::new().schema(Some(schema_ref("ApiError"))).build())
        .build()
}

/// The whole document.
pub fn document() -> Doc {
    let mut doc = Schemas::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    for route in routes() {
        let method = match route.method {
            Get => "get",
            Post => "post",
            Delete => "delete",
            _ => "other",
        };
        let op_id: String = format!("{method}{}", route.path)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
            .replace("__", "_")
            .trim_end_matches('_')
            .to_string();
        let mut op = OperationBuilder::new().summary(Some(route.summary)).operation_id(Some(op_id));
        if let Some(who) = route.auth {
            op = op
                .description(Some(format!("Authorization: Bearer token ({who}).")))
                .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        if route.path.contains("{id}") {
            op = op.parameter(ParameterBuilder::new().name("id").parameter_in(ParameterIn::Path).required(Required::True));
        }
        if route.path == "/v1/agent/wait" {
            op = op.parameter(
                ParameterBuilder::new()
                    .name("timeout_s")
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some("seconds to wait, default 30, at most 60")),
            );
        }
        if let Some(body) = route.body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", ContentBuilder::new().schema(Some(schema_ref(body))).build())
                    .build(),
            ));
        }
        let ok = match route.out {
            Out::One(s) => ResponseBuilder::new()
                .description("success")
                .content("application/json", ContentBuilder::new().schema(Some(schema_ref(s))).build()),
            Out::Many(s) => ResponseBuilder::new().description("success").content(
                "application/json",
                ContentBuilder::new().schema(Some(ArrayBuilder::new().items(schema_ref(s)).build())).build(),
            ),
            Out::Text => ResponseBuilder::new().description("success").content("text/plain", ContentBuilder::new().build()),
            Out::Object => {
                ResponseBuilder::new().description("success").content("application/json", ContentBuilder::new().build())
            }
            Out::Empty => ResponseBuilder::new().description("success, no content"),
        };
        op = op.response(route.status, ok.build());
        if route.path == "/v1/agent/wait" {
            op = op.response("204", ResponseBuilder::new().description("no allocation yet: wait again").build());
        }
        op = op.response("4XX", error_response("client error: `code` says which, `message` what to do"));
        op = op.response("5XX", error_response("internal error"));
        doc.paths.add_path_operation(route.path, vec![route.method], op.build());
    }
    doc
}

/// The document as checked in: pretty JSON with a trailing newline.
pub fn document_json() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("OpenAPI serializes");
    s.push('\n');
    s
}
