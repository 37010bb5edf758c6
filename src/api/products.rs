//! `readthrough.v1.ProductService`.

use tonic::{Request, Response, Status};

use super::{
    convert::{ProductField, mask_fields, product_to_proto},
    page_token::PageTokens,
    respond,
};
use crate::{
    domain::{
        CategoryId, Currency, Description, ExpectedVersion, NewProduct, PageRequest, PriceCents, ProductId,
        ProductName, ProductPatch, ValidationError,
    },
    proto::{self, product_service_server::ProductService},
    service::Products,
};

pub struct ProductApi {
    products: Products,
    tokens: PageTokens,
}

impl ProductApi {
    pub fn new(products: Products, tokens: PageTokens) -> Self {
        Self { products, tokens }
    }
}

#[tonic::async_trait]
impl ProductService for ProductApi {
    async fn get_product(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        respond(async {
            let id = ProductId::parse(&request.get_ref().id)?;
            Ok(product_to_proto(self.products.get(id).await?))
        })
        .await
    }

    async fn list_products(
        &self,
        request: Request<proto::ListProductsRequest>,
    ) -> Result<Response<proto::ListProductsResponse>, Status> {
        respond(async {
            let request = request.get_ref();
            let category = CategoryId::parse(&request.category_id)?;
            let page = if request.page_token.is_empty() {
                PageRequest::parse(request.page, request.page_size)?
            } else if request.page != 0 {
                return Err(ValidationError::new("page", "must be 0 when page_token is set").into());
            } else {
                PageRequest::after(self.tokens.decode(&category, &request.page_token)?, request.page_size)?
            };
            let found = self.products.list(&category, &page).await?;
            Ok(proto::ListProductsResponse {
                products: found.products.into_iter().map(product_to_proto).collect(),
                total_count: found.total as i64,
                page: request.page,
                page_size: page.size() as i32,
                next_page_token: found
                    .next
                    .map(|cursor| self.tokens.encode(&category, &cursor))
                    .unwrap_or_default(),
            })
        })
        .await
    }

    async fn create_product(
        &self,
        request: Request<proto::CreateProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        respond(async {
            let request = request.get_ref();
            let new = NewProduct {
                category_id: CategoryId::parse(&request.category_id)?,
                name: ProductName::parse(&request.name)?,
                description: Description::parse(&request.description)?,
                price_cents: PriceCents::parse(request.price_cents)?,
                currency: Currency::parse(&request.currency)?,
            };
            Ok(product_to_proto(self.products.create(new).await?))
        })
        .await
    }

    async fn update_product(
        &self,
        request: Request<proto::UpdateProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        respond(async {
            let request = request.into_inner();
            let product = request
                .product
                .ok_or_else(|| ValidationError::new("product", "is required"))?;
            let mut patch = ProductPatch {
                id: ProductId::parse(&product.id).map_err(|e| e.in_field("product.id"))?,
                category_id: None,
                name: None,
                description: None,
                price_cents: None,
                currency: None,
                expected_version: ExpectedVersion::parse(request.expected_version)?,
            };
            for field in mask_fields(request.update_mask.as_ref())? {
                match field {
                    ProductField::CategoryId => patch.category_id = Some(CategoryId::parse(&product.category_id)?),
                    ProductField::Name => patch.name = Some(ProductName::parse(&product.name)?),
                    ProductField::Description => patch.description = Some(Description::parse(&product.description)?),
                    ProductField::PriceCents => patch.price_cents = Some(PriceCents::parse(product.price_cents)?),
                    ProductField::Currency => patch.currency = Some(Currency::parse(&product.currency)?),
                }
            }
            Ok(product_to_proto(self.products.update(patch).await?))
        })
        .await
    }

    async fn delete_product(&self, request: Request<proto::DeleteProductRequest>) -> Result<Response<()>, Status> {
        respond(async {
            let id = ProductId::parse(&request.get_ref().id)?;
            self.products.delete(id).await?;
            Ok(())
        })
        .await
    }
}
